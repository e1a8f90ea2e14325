"""The interface every compute backend implements, with the fused paths
composed from the four stages so a new backend only has to write those.
See ``batchnorm.kernels`` for the contract of each stage."""

from __future__ import annotations

import warnings

import torch

from .. import activations
from ..activations import IDENTITY, Activation
from ..numerics import affine_from_stats, grad_input_coefficients, invstd_of, stats_dtype
from . import sign_mask

Tensor = torch.Tensor


class Backend:
    """Base class: subclasses implement the four stages, may override the fused ones."""

    name = "abstract"

    def supports(self, x: Tensor) -> bool:
        """Whether this backend can run on ``x``'s device, dtype and layout."""
        raise NotImplementedError

    def prefers(self, x: Tensor, fused: bool = False) -> bool:
        """Whether the automatic choice should take this backend for ``x`` (it may
        support shapes where another backend is faster, torch's own kernel included),
        plain or ``fused`` with an activation or residual; a forced choice ignores it."""
        return True

    def prefers_eval(self, x: Tensor, fused: bool = False) -> bool:
        """:meth:`prefers` for an eval-mode call (one multiply-add per element, where torch's
        own kernel is harder to beat); by default the same answer."""
        return self.prefers(x, fused)

    # -- the four stages --

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        raise NotImplementedError

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

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
        """``dx`` from the two sums, taken over ``count`` values per channel (default: x's own
        ``N * L``; a synchronized layer passes the global count)."""
        raise NotImplementedError

    # -- fused paths, composed from the stages unless a backend overrides them --

    def apply_act(
        self, x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None, act: Activation = IDENTITY
    ) -> Tensor:
        """Eval ``act(x * scale + shift [+ residual])`` (no autograd): the multiply-add, then the
        add and the activation in place on its output."""
        y = self.apply(x, scale, shift)
        if residual is not None:
            y.add_(residual)
        return activations.apply_(y, act)

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation = IDENTITY
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``act(BN(x))``: statistics, then normalize + scale + shift as one multiply-add, then
        the activation in place; returns ``(y, mean, var, invstd)``."""
        mean, var = self.stats(x)
        invstd = invstd_of(var, eps)
        y = self.apply(x, *affine_from_stats(mean, invstd, weight, bias))
        return activations.apply_(y, act), mean, var, invstd

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
        """The backward of ``act(BN(x))``: ``dz = dy * act'(BN(x))`` (``BN(x)`` recomputed from
        ``x``), both reductions of ``dz``, then ``dx``; returns ``(dx, sum_dz, sum_dz_xmu)``
        (``dweight = sum_dz_xmu * invstd``, ``dbias = sum_dz``)."""
        if act.kind.grad is not None:  # dz, then the plain backward (a subclass's own, if it has one)
            z = self.apply(x, *affine_from_stats(mean, invstd, weight, bias))
            return self.backward_train(dy * activations.grad_from_input(z, act), x, mean, invstd, weight)
        sum_dy, sum_dy_xmu = self.backward_reduce(dy, x, mean)
        dx = self.backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu)
        return dx, sum_dy, sum_dy_xmu

    def forward_train_residual(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor, act: Activation
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``act(BN(x) + residual)`` for the identity and the activations whose backward reads
        a sign mask (``act.keeps_mask``); returns ``(y, mean, var, invstd, mask)`` with the
        :mod:`sign_mask` of ``BN(x) + residual`` (``None`` for the identity).
        By default: the fused forward, the add, the mask and the activation in place."""
        y, mean, var, invstd = self.forward_train(x, weight, bias, eps)
        y.add_(residual)
        mask = sign_mask.pack(y > 0, x) if act.keeps_mask else None
        return activations.apply_(y, act), mean, var, invstd, mask

    def backward_train_residual(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        mask: Tensor,
        act: Activation,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The backward of :meth:`forward_train_residual` from its mask: ``dz = dy * act'``;
        returns ``(dx, dresidual = dz, sum_dz, sum_dz_xmu)``."""
        positive = sign_mask.unpack(mask, x)
        dz = torch.where(positive, dy, dy * act.negative_slope)
        dx, sum_dz, sum_dz_xmu = self.backward_train(dz, x, mean, invstd, weight)
        return dx, dz, sum_dz, sum_dz_xmu

    # -- ghost batches (``virtual_batch_size``): the batch cut into runs of ``size`` samples --

    def forward_train_ghosts(
        self, x: Tensor, size: int, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation = IDENTITY
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``act(BN(ghost))`` for each ghost of ``size`` samples (the last may be smaller), weight
        and bias shared; returns ``(y, mean, var, invstd)`` with statistics ``[G, C]``, one row
        per ghost. By default :meth:`forward_train` on each ghost, into one output."""
        y = torch.empty_like(x)
        stats = []
        for ghost, out in zip(x.split(size), y.split(size), strict=True):
            yg, *ghost_stats = self.forward_train(ghost, weight, bias, eps, act)
            out.copy_(yg)
            stats.append(ghost_stats)
        mean, var, invstd = (torch.stack(s) for s in zip(*stats, strict=True))
        return y, mean, var, invstd

    def backward_train_ghosts(
        self,
        dy: Tensor,
        x: Tensor,
        size: int,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None = None,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The backward of :meth:`forward_train_ghosts` (``mean``, ``invstd``: ``[G, C]``); returns
        ``(dx, sum_dz, sum_dz_xmu)``, the sums ``[G, C]`` over each ghost. By default
        :meth:`backward_train` on each ghost."""
        dx = torch.empty_like(x)
        sums = []
        for g, (dyg, xg, out) in enumerate(zip(dy.split(size), x.split(size), dx.split(size), strict=True)):
            dxg, *ghost_sums = self.backward_train(dyg, xg, mean[g], invstd[g], weight, bias, act)
            out.copy_(dxg)
            sums.append(ghost_sums)
        sum_dz, sum_dz_xmu = (torch.stack(s) for s in zip(*sums, strict=True))
        return dx, sum_dz, sum_dz_xmu

    # -- masked (``mask=``): statistics over the valid positions, 0 at the others --

    def forward_train_masked(
        self,
        x: Tensor,
        valid: Tensor,
        count: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``act(BN(x))`` with the statistics over the ``count`` positions where the boolean
        ``valid[N, L]`` holds, and 0 at the others; returns ``(y, mean, var, invstd)``. By
        default in torch ops around :meth:`apply`."""
        keep = valid.unsqueeze(1)  # N,1,L
        xs = torch.where(keep, x, 0.0).to(stats_dtype(x.dtype))  # padded values (even NaN) reach nothing
        mean = xs.sum((0, 2)) / count
        centered = torch.where(keep, xs - mean[:, None], 0.0)
        var = (centered * centered).sum((0, 2)) / count
        invstd = invstd_of(var, eps)
        y = activations.apply_(self.apply(x, *affine_from_stats(mean, invstd, weight, bias)), act)
        return y.masked_fill_(~keep, 0.0), mean, var, invstd

    def backward_train_masked(
        self,
        dy: Tensor,
        x: Tensor,
        valid: Tensor,
        count: int,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None = None,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The backward of :meth:`forward_train_masked`; returns ``(dx, sum_dz, sum_dz_xmu)``,
        the sums over the valid positions, ``dx`` 0 at the others. By default the padded
        positions are given ``dz = 0`` and ``x = mean`` (they add nothing to the sums), then
        :meth:`backward_reduce` and :meth:`backward_apply` over ``count``."""
        keep = valid.unsqueeze(1)  # N,1,L
        grad = activations.grad_from_input(self.apply(x, *affine_from_stats(mean, invstd, weight, bias)), act)
        dz = torch.where(keep, dy if grad is None else dy * grad, 0.0).to(x.dtype)
        xz = torch.where(keep, x, mean.to(x.dtype)[:, None])
        sum_dz, sum_dz_xmu = self.backward_reduce(dz, xz, mean)
        dx = self.backward_apply(dz, xz, mean, invstd, weight, sum_dz, sum_dz_xmu, count)
        return dx.masked_fill_(~keep, 0.0), sum_dz, sum_dz_xmu

    # -- deprecated names: the activation became an argument of forward_train/backward_train --

    def forward_train_act(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Deprecated: ``forward_train(x, weight, bias, eps, act)``, which also returns the invstd."""
        _deprecated("forward_train_act(x, weight, bias, eps, act)", "forward_train(x, weight, bias, eps, act)")
        return self.forward_train(x, weight, bias, eps, act)[:3]

    def backward_train_act(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        act: Activation,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Deprecated: ``backward_train(dy, x, mean, invstd, weight, bias, act)``."""
        _deprecated("backward_train_act(...)", "backward_train(dy, x, mean, invstd, weight, bias, act)")
        return self.backward_train(dy, x, mean, invstd, weight, bias, act)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"Backend.{old} is deprecated; use Backend.{new}", DeprecationWarning, stacklevel=3)


def count_of(x: Tensor, count: int | None) -> int:
    """Values per channel the backward's sums are over: ``count``, else x's ``N * L``."""
    return x.shape[0] * x.shape[2] if count is None else count


__all__ = ["Backend", "affine_from_stats", "count_of", "grad_input_coefficients"]
