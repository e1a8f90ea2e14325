"""Masked batch norm: statistics over the valid positions only (padded sequences, images
with holes), ``bn(x, mask=m)``.

``mask`` has the input's shape without the channel dimension (``(N, L)`` for ``(N, C, L)``,
``(N, H, W)`` for ``(N, C, H, W)``, ``(N,)`` for ``(N, C)``), ``True`` where a value is
real. In training the mean and biased variance of each channel are taken over the valid
positions, the running statistics get those (over the valid count); in eval the running
statistics are used. The output at a padded position is 0 (after the residual add and
the activation too), and no gradient flows from or to it: at the valid positions the
layer is batch norm over the valid subset, gradients included.

In training the statistics, the normalization and the backward are the backend's masked
stages (the numba backend's run over the mask's valid stretches, in one launch each way;
see :func:`batch_norm`).
"""

from __future__ import annotations

import torch

from . import _ops, _route, _torch_ops, activations, kernels
from ._checks import ShapeError
from ._layout import as_ncl, output_memory_format, per_channel, prepare, reduce_dims, restore
from .activations import IDENTITY
from .numerics import affine_from_stats, invstd_of, stats_dtype
from .running import update_on_device, update_running_stats

Tensor = torch.Tensor

TOO_FEW_VALID = "Expected more than 1 valid value per channel when training"


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

    Training, eagerly: the backend's masked forward and backward (``forward_train_masked``;
    the numba backend's kernels read only the valid values), with the activation inside
    when there is no residual. Under tools that follow only torch's ops (tracing, export,
    compile), the same in plain torch ops, which autograd differentiates."""
    check_mask(x, mask)
    if x.numel() == 0:
        return torch.zeros_like(x)
    valid = mask.unsqueeze(1)  # (N, 1, *)
    after = act  # the activation still to apply
    if not training:
        mean, invstd = running_mean, invstd_of(running_var.to(stats_dtype(running_var.dtype)), eps)
        y = _torch_ops.affine(x, *affine_from_stats(mean.to(invstd.dtype), invstd, weight, bias))
    elif _route.tool_needs_torch_ops() or torch.compiler.is_compiling():
        # a tool records ops and cannot read the data: the valid count stays a tensor, so a traced, exported or
        # compiled layer counts the mask of each call, not the one it was recorded with
        count = mask.sum()
        # raises where the tool keeps the check (compile, export); a trace drops it, and one valid value gives NaN
        # statistics there, which the running update skips (skip_nonfinite)
        torch._assert_async(count > 1, TOO_FEW_VALID)
        y, mean, var = _normalized_in_torch_ops(x, valid, count, weight, bias, eps)
        if running_mean is not None or running_var is not None:
            update_on_device(running_mean, running_var, mean.detach(), var.detach(), count, momentum,
                             num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    else:
        count = int(mask.sum())
        if count <= 1:
            raise ValueError(f"{TOO_FEW_VALID}, got {count} (mask)")
        fused = act if residual is None else IDENTITY  # the activation the kernels apply (0 where padded)
        function = _MaskedFunction.apply if _ops.needs_autograd(x, weight, bias) else _forward_impl
        y, mean, var, _ = function(x, mask.reshape(x.shape[0], -1), count, weight, bias, eps, fused)
        after = None if residual is None else act
        if running_mean is not None or running_var is not None:
            update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum,
                                 num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    if after is None:
        return y
    if residual is not None:
        y = y + residual
    return torch.where(valid, activations.forward(y, after), 0.0)


def _forward_impl(x, valid, count, weight, bias, eps, act):
    """``(y, mean, var, invstd)`` from the backend's masked forward (``valid``: ``(N, L)``)."""
    x = prepare(x)
    x3 = as_ncl(x)
    backend = kernels.select(x3, fused=True, any_size=True)  # torch has no masked kernel: ours at any size
    y3, mean, var, invstd = backend.forward_train_masked(x3, valid, count, weight, bias, eps, act)
    return restore(y3, x), mean, var, invstd


class _MaskedFunction(torch.autograd.Function):
    """Masked batch norm on our kernels; a differentiated backward (double backward) takes the
    gradient of the same layer in torch ops instead."""

    @staticmethod
    def forward(ctx, x, valid, count, weight, bias, eps, act):
        y, mean, var, invstd = _forward_impl(x, valid, count, weight, bias, eps, act)
        ctx.mark_non_differentiable(mean, var, invstd)
        ctx.save_for_backward(x, valid, weight, bias, mean, invstd)
        ctx.count, ctx.eps, ctx.act = count, eps, act
        return y, mean, var, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dinvstd):
        x, valid, weight, bias, mean, invstd = ctx.saved_tensors
        inputs = (x, weight, bias)
        needs = ctx.needs_input_grad
        wanted = [t is not None and need for t, need in zip(inputs, (needs[0], needs[3], needs[4]), strict=True)]
        if torch.is_grad_enabled():
            keep = valid.view(x.shape[0], 1, *x.shape[2:])
            y = _normalized_in_torch_ops(x, keep, ctx.count, weight, bias, ctx.eps)[0]
            y = torch.where(keep, activations.forward(y, ctx.act), 0.0)
            grads = iter(torch.autograd.grad(y, [t for t, w in zip(inputs, wanted, strict=True) if w], dy,
                                             create_graph=True))  # fmt: skip
            dx, dweight, dbias = (next(grads) if w else None for w in wanted)
            return dx, None, None, dweight, dbias, None, None
        xp = prepare(x)
        x3, dy3 = as_ncl(xp), as_ncl(dy.contiguous(memory_format=output_memory_format(xp)))
        dx3, sum_dz, sum_dz_xmu = kernels.select(x3, fused=True, any_size=True).backward_train_masked(
            dy3, x3, valid, ctx.count, mean, invstd, weight, bias, ctx.act
        )
        dweight = None if not wanted[1] else (sum_dz_xmu * invstd).to(weight.dtype)
        dbias = None if not wanted[2] else sum_dz.to(bias.dtype)
        return (restore(dx3, xp) if wanted[0] else None), None, None, dweight, dbias, None, None


def _normalized_in_torch_ops(x, valid, count, weight, bias, eps):
    sdtype = stats_dtype(x.dtype)
    xs = torch.where(valid, x.to(sdtype), 0.0)  # padded values (even NaN) reach nothing
    dims = reduce_dims(x)
    mean = xs.sum(dims) / count
    if isinstance(count, Tensor):  # counted under a tool that cannot raise (torch.jit.trace): NaN, never a result
        mean = torch.where(count > 1, mean, torch.nan)
    centered = torch.where(valid, xs - per_channel(mean, x), 0.0)
    var = (centered * centered).sum(dims) / count
    scale = invstd_of(var, eps)
    if weight is not None:
        scale = scale * weight.to(sdtype)
    y = (xs - per_channel(mean, x)) * per_channel(scale, x)
    if bias is not None:
        y = y + per_channel(bias.to(sdtype), x)
    return y.to(x.dtype), mean, var
