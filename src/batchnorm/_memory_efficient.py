"""Memory-saving training mode: keep only the layer's output for the backward.

For an invertible activation the backward recovers everything from ``y``:
``z = act^-1(y)``, ``act'(z)`` from ``y``, and ``xhat = (z - beta) / gamma``
(In-Place Activated BatchNorm, Rota Bulo et al. 2018, with standard weights).
The input is not saved, so it can be freed, or overwritten by the output
(``inplace=True``). Eager mode only; it needs every ``gamma`` to be non-zero.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import activations
from ._layout import per_channel, reduce_dims
from .activations import Activation
from .kernels import stats_dtype

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
    if weight is not None and bool((weight == 0).any()):
        zero = torch.nonzero(weight == 0).flatten().tolist()[:8]
        raise ValueError(
            f"{why} recomputes the normalized input as (z - bias) / weight, so every weight "
            f"(gamma) must be non-zero; channels {zero} have weight 0"
        )


class MemoryEfficientBatchNorm(torch.autograd.Function):
    """``act(BN(x))`` in training, saving ``y`` (and ``C``-sized tensors) only."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act: Activation, inplace: bool, forward_train):
        y, mean, var, _ = forward_train(x, weight, bias, eps, None, act.name, act.param)
        if inplace:
            x.copy_(y)  # the output now lives in the input's storage
            ctx.mark_dirty(x)
            y = x
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(y, weight, bias, var)
        ctx.eps, ctx.act = eps, act
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        y, weight, bias, var = ctx.saved_tensors
        sdtype = stats_dtype(y.dtype)
        dims = reduce_dims(y)
        n = y.numel() // y.shape[1]
        invstd = torch.rsqrt(var + ctx.eps)  # C
        dz = dy.to(sdtype)
        act_grad = activations.grad_from_output(y, ctx.act)
        if act_grad is not None:
            dz = dz * act_grad.to(sdtype)  # like y
        xhat = activations.inverse(y, ctx.act).to(sdtype)  # z
        if bias is not None:
            xhat = xhat - per_channel(bias.to(sdtype), y)
        if weight is not None:
            xhat = xhat / per_channel(weight.to(sdtype), y)  # like y: (z - beta) / gamma
        sum_dz = dz.sum(dims)  # C
        sum_dz_xhat = (dz * xhat).sum(dims)  # C
        k = invstd if weight is None else invstd * weight.to(sdtype)  # C
        dx = per_channel(k, y) * (dz - per_channel(sum_dz / n, y) - xhat * per_channel(sum_dz_xhat / n, y))
        dweight = None if weight is None else sum_dz_xhat.to(weight.dtype)
        dbias = None if bias is None else sum_dz.to(bias.dtype)
        return dx.to(dy.dtype), dweight, dbias, None, None, None, None
