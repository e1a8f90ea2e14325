"""Memory-saving training mode: keep only the layer's output for the backward.

For an invertible activation the backward recovers everything from ``y``:
``z = act^-1(y)``, ``act'(z)`` from ``y``, and ``xhat = (z - beta) / gamma``
(In-Place Activated BatchNorm, Rota Bulo et al. 2018, with standard weights).
The input is not saved, so it can be freed, or overwritten by the output
(``inplace=True``). It needs every ``gamma`` to be non-zero; tracers and export run torch's
ops instead (``_route``), which keep the input.
The backward's ``dx`` is ``numerics.grad_input_coefficients`` applied to the
recovered ``x - mean = (z - beta) / (gamma * invstd)``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _ops, _route, activations
from ._layout import per_channel, reduce_dims
from .activations import Activation
from .numerics import affine_from_stats, grad_input_coefficients, stats_dtype

Tensor = torch.Tensor


def check(act: Activation, weight: Tensor | None, residual: Tensor | None, why: str = "memory_efficient=True") -> None:
    """Raise unless the output alone determines the backward (``why``: what asked for that)."""
    if not act.invertible:
        raise ValueError(
            f"{why} needs an invertible activation (identity, leaky_relu with a positive "
            f"slope, elu with a positive alpha) to recover the input from the output; got {act}"
        )
    if residual is not None:
        raise ValueError(
            f"{why} cannot take a residual: recovering the normalized input from the output "
            "would need the residual too; add it outside the layer"
        )
    # read on the host only for CPU weights: on an accelerator it would stop the device every step
    # (there a zero weight makes its channel's gradients NaN, visibly, rather than wrong); a tool that
    # records ops runs torch's, which keep the input (nothing is recomputed); under torch.compile the
    # check is an op of the graph
    if weight is None or weight.device.type != "cpu" or _route.tool_needs_torch_ops():
        return
    message = f"{why} recomputes the normalized input as (z - bias) / weight, so every weight (gamma) must be non-zero"
    if torch.compiler.is_compiling():
        torch._assert_async((weight != 0).all(), message)
    elif bool((weight == 0).any()):
        zero = torch.nonzero(weight == 0).flatten().tolist()[:8]
        raise ValueError(f"{message}; channels {zero} have weight 0")


class MemoryEfficientBatchNorm(torch.autograd.Function):
    """``act(BN(x))`` in training, saving ``y`` (and ``C``-sized tensors) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act: Activation, inplace: bool):
        y, mean, var, invstd, _ = _ops.forward_train(x, weight, bias, eps, None, act)
        if inplace:
            x.copy_(y)  # the output now lives in the input's storage
            ctx.mark_dirty(x)
            y = x
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(y, weight, bias, mean, invstd)
        ctx.act = act
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        y, weight, bias, mean, invstd = ctx.saved_tensors
        sdtype = stats_dtype(y.dtype)
        dims = reduce_dims(y)
        dz = dy.to(sdtype)
        act_grad = activations.grad_from_output(y, ctx.act)
        if act_grad is not None:
            dz = dz * act_grad.to(sdtype)  # like y
        # x - mean = (z - bias) / k, k = weight * invstd: the input, recovered up to its mean
        scale, shift = affine_from_stats(torch.zeros_like(mean), invstd, weight, bias)  # C: k, bias
        xmu = (activations.inverse(y, ctx.act).to(sdtype) - per_channel(shift, y)) / per_channel(scale, y)
        sum_dz = dz.sum(dims)  # C
        sum_dz_xmu = (dz * xmu).sum(dims)  # C
        n = y.numel() // y.shape[1]
        k, a, b = grad_input_coefficients(torch.zeros_like(mean), invstd, weight, sum_dz, sum_dz_xmu, n)  # C
        dx = dz * per_channel(k, y) + xmu * per_channel(a, y) + per_channel(b, y)
        dweight = None if weight is None else (sum_dz_xmu * invstd).to(weight.dtype)
        dbias = None if bias is None else sum_dz.to(bias.dtype)
        return dx.to(dy.dtype), dweight, dbias, None, None, None
