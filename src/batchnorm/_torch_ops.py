"""The layer in torch's own batch-norm ops: the path every tool that cannot see
into our kernels takes.

Tracers (``torch.jit.trace``, the TorchScript ONNX exporter), ``torch.export``,
forward-mode AD, ``torch.func`` transforms and TorchScript all understand
``aten::batch_norm`` and ``aten::native_batch_norm``; they cannot see through a
kernel that writes through NumPy or an ``autograd.Function`` without a ``jvp``.
So there, and where torch's kernel is simply the faster choice, the layer runs
these functions: torch's kernel for the normalization and our semantics around
it (a non-finite batch skipped, the fused residual add and activation).

Everything here is TorchScript-compatible (``torch.jit.script`` compiles it as
part of a layer's ``forward``) and records as plain torch ops under a tracer.
"""

from __future__ import annotations

import torch

from . import activations
from .running import update_from_invstd, update_on_device

Tensor = torch.Tensor


def activate(y: Tensor, residual: Tensor | None, name: str, param: float, owned: bool) -> Tensor:
    """``act(y + residual)``; ``owned``: ``y`` is a fresh tensor of ours, so activations whose
    backward needs only their output run in place (autograd then keeps one tensor, not two)."""
    if residual is not None:
        y = y + residual
        owned = True
    return activations.activate(y, name, param, owned and name != "silu")


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x * scale[c] + shift[c]`` over dim 1, in ``x``'s dtype and memory format."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    skip_nonfinite: bool,
    nonfinite_count: Tensor | None,
    act_name: str,
    act_param: float,
    residual: Tensor | None,
) -> Tensor:
    """``act(BN(input) + residual)`` with our semantics, normalized by torch's kernel.

    Arguments as in ``functional.batch_norm``. In training with running buffers and
    ``skip_nonfinite``, the statistics come from ``native_batch_norm`` and are folded
    in by ``running.update_running_stats`` (a non-finite batch is skipped); otherwise torch's
    kernel updates the buffers itself, exactly as ``torch.nn.BatchNorm*`` does.
    """
    cudnn = torch.backends.cudnn.enabled
    keeps_stats = running_mean is not None or running_var is not None
    if not training or not keeps_stats or input.numel() == 0:
        if training and keeps_stats and num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # an empty batch: nothing to learn, torch still counts it
        y = torch.batch_norm(input, weight, bias, running_mean, running_var, training, 0.0, eps, cudnn)
    elif not skip_nonfinite:
        factor = 0.0 if momentum is None else momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:  # cumulative average
                factor = 1.0 / float(num_batches_tracked)
        y = torch.batch_norm(input, weight, bias, running_mean, running_var, True, factor, eps, cudnn)
    elif torch.jit.is_tracing():
        # a traced native_batch_norm followed by SiLU breaks TorchScript's autodiff from the graph's third run
        # ("Schema not found for node"): there, torch's batch_norm for the output and the statistics beside it
        y = torch.batch_norm(input, weight, bias, None, None, True, 0.0, eps, cudnn)
        mean, var = _batch_statistics(input)
        update_on_device(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum,
                         num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    else:
        y, mean, invstd = torch.native_batch_norm(input, weight, bias, None, None, True, 0.0, eps)
        count = input.numel() // input.shape[1]
        if torch.jit.is_scripting():
            var = invstd.detach().pow(-2) - eps  # the biased variance, back from 1 / sqrt(var + eps)
            update_on_device(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                           skip_nonfinite, nonfinite_count)  # fmt: skip
        else:
            _update_eager(running_mean, running_var, mean, invstd, eps, count, momentum, num_batches_tracked,
                          skip_nonfinite, nonfinite_count)  # fmt: skip
    return activate(y, residual, act_name, act_param, True)


def _batch_statistics(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel, the mean and biased variance of ``input`` (without gradient), in at least float32 as
    torch's kernel takes them."""
    x = input.detach()
    if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
        x = x.float()
    dims = [0] + list(range(2, x.dim()))  # noqa: RUF005 (TorchScript compiles this: no star unpacking)
    var, mean = torch.var_mean(x, dims, correction=0)
    return mean, var


@torch.jit.unused
def _update_eager(running_mean, running_var, mean, invstd, eps, count, momentum, num_batches_tracked,
                  skip_nonfinite, nonfinite_count) -> None:  # fmt: skip
    update_from_invstd(running_mean, running_var, mean.detach(), invstd.detach(), eps, count, momentum,
                       num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
