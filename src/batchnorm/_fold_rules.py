"""The arithmetic of ``batchnorm.fold``: merging a per-channel ``x * scale + shift`` into a layer.

A batch norm in eval is ``x * scale + shift`` per channel. After a layer (BN of its output)
it scales the layer's output channels: ``W' = W * scale[out]``, ``b' = b * scale + shift``.
Before a layer (the layer applied to BN of its input) it scales the input channels,
``W' = W * scale[in]``, and its shift becomes a bias ``b' = b + sum_{i,k} W[o, i, k] * shift[i]``
only where every output sums every tap over real (shifted) inputs: a Linear; a convolution
without padding, or padding by copying its input (reflect, replicate, circular); a
transposed convolution with a 1-element kernel and stride 1. Zero padding is not shifted
(border outputs would change), and a strided or wider transposed convolution sums a
different number of taps per output: there a shift does not fold (a pure scale does).

Weights are laid out ``(out, in / groups, *k)`` for convolutions and ``(in, out / groups, *k)``
for transposed ones; both are handled with any groups (depthwise included), stride and
dilation. Every function returns a new layer with new parameters and never changes the
layer it is given (whose tensors may be used elsewhere). The arithmetic runs in float32
(float64 for float64 weights) and the result is cast back to the layer's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def channel_rank(layer: nn.Module) -> int:
    """The rank of the batched input/output of ``layer`` whose dim 1 is its channel (feature) dim."""
    return 2 if isinstance(layer, nn.Linear) else layer.weight.dim()


def why_shift_does_not_fold_before(layer: nn.Module) -> str | None:
    """``None`` where a shift of ``layer``'s input is exactly a bias of its output, else why not."""
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        if all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride):
            return None  # one tap per output (its padding crops the output: nothing is padded)
        return (
            f"it is a transposed convolution (kernel {tuple(layer.kernel_size)}, stride {tuple(layer.stride)}): "
            "its outputs sum different numbers of taps, so a shift of its input is no per-channel bias"
        )
    if _pads(layer) and layer.padding_mode == "zeros":
        return (
            f"it pads with zeros (padding={layer.padding}): the padded zeros would not be shifted, "
            "so border outputs would change"
        )
    return None


def _pads(layer: nn.Module) -> bool:
    return any(p != 0 for p in layer._reversed_padding_repeated_twice)


def fold_after(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` computing ``layer(x) * scale + shift`` per output channel."""
    weight, bias = _working_copies(layer, scale)
    scale, shift = scale.to(weight), shift.to(weight)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        groups = layer.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
        weight = (grouped * scale.view(groups, 1, -1, 1)).reshape(weight.shape)
    else:
        weight = weight * scale.view([-1] + [1] * (weight.dim() - 1))
    return _with_parameters(layer, weight, bias * scale + shift)


def fold_before(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` computing ``layer(x * scale + shift)``, ``scale`` and ``shift`` per input
    channel; only where :func:`why_shift_does_not_fold_before` is ``None`` or ``shift`` is all zeros."""
    weight, bias = _working_copies(layer, scale)
    scale, shift = scale.to(weight), shift.to(weight)
    groups = getattr(layer, "groups", 1)
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # (in, out/g, *k): in-channels are rows
        in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
        grouped = weight.reshape(groups, in_per_group, out_per_group, -1)
        bias = bias + (grouped * shift.view(groups, in_per_group, 1, 1)).sum(dim=(1, 3)).reshape(-1)
        weight = weight * scale.view([-1] + [1] * (weight.dim() - 1))
    else:  # (out, in/g, *k): in-channels of group g are columns of rows g*out/g ..
        out_per_group, in_per_group = weight.shape[0] // groups, weight.shape[1]
        grouped = weight.reshape(groups, out_per_group, in_per_group, -1)
        bias = bias + (grouped * shift.view(groups, 1, in_per_group, 1)).sum(dim=(2, 3)).reshape(-1)
        weight = (grouped * scale.view(groups, 1, in_per_group, 1)).reshape(weight.shape)
    return _with_parameters(layer, weight, bias)


def _working_copies(layer: nn.Module, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s weight and bias (zeros if it has none) in the dtype the fold computes in."""
    weight = layer.weight.detach()
    dtype = torch.promote_types(torch.promote_types(weight.dtype, torch.float32), scale.dtype)
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if layer.bias is None:
        return weight.to(dtype), torch.zeros(out_channels, dtype=dtype, device=weight.device)
    return weight.to(dtype), layer.bias.detach().to(dtype)


def _with_parameters(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A shallow copy of ``layer`` (its own parameter dict) with new ``weight`` and ``bias`` in its dtype."""
    new = type(layer).__new__(type(layer))
    new.__dict__ = layer.__dict__.copy()
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._modules = dict(layer._modules)
    dtype = layer.weight.dtype
    new.weight = nn.Parameter(weight.to(dtype).contiguous(memory_format=_memory_format(layer.weight)))
    new.bias = nn.Parameter(bias.to(dtype))
    return new


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous():
        return torch.channels_last
    if tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d) and not tensor.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format
