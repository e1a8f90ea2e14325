"""The ``torch`` backend: torch operations on the ``(N, C, L)`` view.

Runs on any device and floating dtype; it is the fallback for whatever the fast
backends do not take, and the second oracle (besides ``reference``) in tests.
The fused training paths call torch's own batch-norm kernels
(``native_batch_norm`` and its backward: one call each, torch's numerics) when
input and parameters share a float32/float64 dtype; the stages, and everything
else, are composite ops with ``torch.var_mean`` (a Welford reduction) in at
least float32.
"""

from __future__ import annotations

import torch

from .. import activations
from ..activations import IDENTITY, Activation
from ..numerics import grad_input_coefficients, stats_dtype
from .base import Backend, count_of

Tensor = torch.Tensor
_REDUCE = (0, 2)  # N and L of the (N, C, L) view


def _col(v: Tensor) -> Tensor:
    return v.view(1, -1, 1)  # C -> 1,C,1


def _native(x: Tensor, *params: Tensor | None) -> bool:
    """Whether torch's fused kernels give statistics in the dtype we keep (float32/64, no mixing)."""
    return x.dtype in (torch.float32, torch.float64) and all(p is None or p.dtype == x.dtype for p in params)


def _dense(x: Tensor) -> bool:
    """Contiguous or channels-last (N, C, L): what torch's kernels read in place."""
    return x.is_contiguous() or x.permute(0, 2, 1).is_contiguous()


class TorchBackend(Backend):
    name = "torch"

    def supports(self, x: Tensor) -> bool:
        return x.is_floating_point()

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation = IDENTITY
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not _native(x, weight, bias):
            return super().forward_train(x, weight, bias, eps, act)
        # as (N, C, 1, L) a channels-last (N, C, L) view is a channels-last 4-D tensor, which
        # torch's kernels handle (vectorized) in place; a contiguous one stays contiguous
        y, mean, invstd = torch.native_batch_norm(x.unsqueeze(2), weight, bias, None, None, True, 0.0, eps)
        var = invstd.pow(-2).sub_(eps)  # the biased variance, for the running update
        return activations.apply_(y.squeeze(2), act), mean, var, invstd

    def backward_train(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None = None,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor]:
        native = _native(x, weight, mean) and dy.stride() == x.stride() and _dense(x)
        if not native or act.kind.grad is not None:
            return super().backward_train(dy, x, mean, invstd, weight, bias, act)
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy.unsqueeze(2), x.unsqueeze(2), weight, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
        return dx.squeeze(2), dbias, dweight / invstd  # sum(dy * (x - mean)) = sum(dy * xhat) / invstd

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sdtype = stats_dtype(x.dtype)
        var, mean = torch.var_mean(x if x.dtype == sdtype else x.to(sdtype), dim=_REDUCE, correction=0)  # C, C
        return mean, var

    def apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if x.dtype == scale.dtype:
            return torch.addcmul(_col(shift), x, _col(scale))  # N,C,L
        return torch.addcmul(_col(shift), x.to(scale.dtype), _col(scale)).to(x.dtype)

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        dy_s = dy.to(mean.dtype)  # N,C,L in the statistics dtype
        sum_dy = dy_s.sum(_REDUCE)  # C
        sum_dy_xmu = (dy_s * (x.to(mean.dtype) - _col(mean))).sum(_REDUCE)  # C
        return sum_dy, sum_dy_xmu

    def backward_apply(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        sum_dy: Tensor,
        sum_dy_xmu: Tensor,
        count: int | None = None,
    ) -> Tensor:
        k, a, b = grad_input_coefficients(mean, invstd, weight, sum_dy, sum_dy_xmu, count_of(x, count))  # C, C, C
        sdtype = mean.dtype
        dx = torch.addcmul(_col(b), dy.to(sdtype), _col(k)).addcmul_(x.to(sdtype), _col(a))  # N,C,L
        return dx.to(dy.dtype)
