"""Layout helpers shared by the functional ops and SyncBatchNorm: the canonical
``(N, C, L)`` view every backend works on, and the memory format of outputs
(channels-last in, channels-last out; anything else contiguous, as torch does)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def as_ncl(x: Tensor) -> Tensor:
    """``(B, C)`` -> ``(B, C, 1)``; ``(B, C, *spatial)`` -> ``(B, C, L)`` (a view when possible)."""
    if x.dim() == 2:
        return x.unsqueeze(-1)
    return x if x.dim() == 3 else x.flatten(2)


def output_memory_format(x: Tensor) -> torch.memory_format:
    """Channels-last input keeps channels-last output; anything else is contiguous."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def prepare(x: Tensor) -> Tensor:
    """``x`` in the memory format the output will have, so kernels read it densely."""
    return x.contiguous(memory_format=output_memory_format(x))


def restore(y3: Tensor, like: Tensor) -> Tensor:
    """``y3`` back in ``like``'s shape and memory format, as a tensor of its own.

    A custom op's output must not be a view (autograd would forbid in-place ops
    on it, such as ``relu_``); ``detach`` gives a tensor of its own on the same
    storage, without a copy.
    """
    return y3.reshape(like.shape).contiguous(memory_format=output_memory_format(like)).detach()


def reduce_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def per_channel(v: Tensor, like: Tensor) -> Tensor:
    return v.view([1, -1] + [1] * (like.dim() - 2))
