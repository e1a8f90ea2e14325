"""Masked batch norm: statistics over the valid positions only (padded sequences, images
with holes), ``bn(x, mask=m)``.

``mask`` has the input's shape without the channel dimension (``(N, L)`` for ``(N, C, L)``,
``(N, H, W)`` for ``(N, C, H, W)``, ``(N,)`` for ``(N, C)``), ``True`` where a value is
real. In training the mean and biased variance of each channel are taken over the valid
positions, the running statistics get those (over the valid count); in eval the running
statistics are used. The output at a padded position is 0 (after the residual add and
the activation too), and no gradient flows from or to it: at the valid positions the
layer is batch norm over the valid subset, gradients included.

In training the statistics pass and the normalization are our kernels' (see
:func:`batch_norm`), with a few elementwise torch ops around them for the mask.
"""

from __future__ import annotations

import torch

from . import _ops, _route, _torch_ops, activations, kernels
from ._checks import ShapeError
from ._layout import as_ncl, per_channel, prepare, reduce_dims
from .numerics import affine_from_stats, invstd_of, stats_dtype
from .running import update_running_stats

Tensor = torch.Tensor


def check_mask(x: Tensor, mask: Tensor) -> None:
    expected = (x.shape[0], *x.shape[2:])
    if tuple(mask.shape) != expected:
        raise ShapeError(
            f"mask must have the input's shape without the channel dimension, {expected}, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a torch.bool tensor (True where a value is real), got {mask.dtype}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device}, the input on {x.device}")


def batch_norm(
    x: Tensor,
    mask: Tensor,
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
    act: activations.Activation,
    residual: Tensor | None,
) -> Tensor:
    """``act(BN(x) + residual)`` at the valid positions of ``mask``, 0 elsewhere (arguments as
    in ``functional.batch_norm``, already checked).

    Training, eagerly: the valid mean, then the padded positions filled with it, so our
    kernels' statistics pass and ``_ops.NormalizeWithStats`` (statistics given, their
    dependence on x in the backward) see the valid values plus values that move neither
    the mean nor the sums of the backward; the variance is rescaled to the valid count.
    Under tools that follow only torch's ops (tracing, export, compile), the same in plain
    torch ops, which autograd differentiates."""
    check_mask(x, mask)
    if x.numel() == 0:
        return torch.zeros_like(x)
    valid = mask.unsqueeze(1)  # (N, 1, *)
    if not training:
        mean, invstd = running_mean, invstd_of(running_var.to(stats_dtype(running_var.dtype)), eps)
        y = _torch_ops.affine(x, *affine_from_stats(mean.to(invstd.dtype), invstd, weight, bias))
    else:
        count = int(mask.sum())
        if count <= 1:
            raise ValueError(f"Expected more than 1 valid value per channel when training, got {count} (mask)")
        if _route.tool_needs_torch_ops() or torch.compiler.is_compiling():
            y, mean, var = _normalized_in_torch_ops(x, valid, count, weight, bias, eps)
        else:
            y, mean, var = _normalized_by_kernels(x, valid, count, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum,
                                 num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    if residual is not None:
        y = y + residual
    y = activations.forward(y, act)
    if training and residual is None:  # y is finite where padded (x filled with the mean): a multiply
        return y * valid.to(y.dtype)
    return torch.where(valid, y, 0.0)  # (eval, or a residual: the padding's own values are there)


def _normalized_by_kernels(x, valid, count, weight, bias, eps):
    sdtype = stats_dtype(x.dtype)
    zeroed = torch.where(valid, x, 0.0)  # the gradient reaches x where valid
    with torch.no_grad():
        mean = zeroed.sum(reduce_dims(x), dtype=sdtype) / count
    filled = torch.addcmul(zeroed, (~valid).to(x.dtype), per_channel(mean.to(x.dtype), x))  # padded: the mean
    x3 = as_ncl(prepare(filled.detach()))
    with torch.no_grad():
        _, spread = kernels.select(x3).stats(x3)  # around the valid mean: padded values add 0
        var = spread.to(sdtype) * (x3.shape[0] * x3.shape[2] / count)
    invstd = invstd_of(var, eps)
    y = _ops.NormalizeWithStats.apply(filled, weight, bias, mean, invstd, count, _local_sums)
    return y, mean, var


def _local_sums(sum_dy: Tensor, sum_dy_xmu: Tensor) -> tuple[Tensor, Tensor]:
    return sum_dy, sum_dy_xmu


def _normalized_in_torch_ops(x, valid, count, weight, bias, eps):
    sdtype = stats_dtype(x.dtype)
    xs = torch.where(valid, x.to(sdtype), 0.0)  # padded values (even NaN) reach nothing
    dims = reduce_dims(x)
    mean = xs.sum(dims) / count
    centered = torch.where(valid, xs - per_channel(mean, x), 0.0)
    var = (centered * centered).sum(dims) / count
    scale = invstd_of(var, eps)
    if weight is not None:
        scale = scale * weight.to(sdtype)
    y = (xs - per_channel(mean, x)) * per_channel(scale, x)
    if bias is not None:
        y = y + per_channel(bias.to(sdtype), x)
    return y.to(x.dtype), mean, var
