"""The interface every compute backend implements, with the fused paths
composed from the four stages so a new backend only has to write those.
See ``batchnorm.kernels`` for the contract of each stage."""

from __future__ import annotations

import torch

from .. import activations
from ..activations import Activation
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
        support shapes where another backend is faster), plain or ``fused`` with an
        activation or residual; a forced choice ignores it."""
        return True

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
    ) -> Tensor:
        raise NotImplementedError

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Statistics, then normalize + scale + shift as one multiply-add."""
        mean, var = self.stats(x)
        scale, shift = affine_from_stats(mean, torch.rsqrt(var + eps), weight, bias)
        return self.apply(x, scale, shift), mean, var

    def backward_train(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Both reductions, then ``dx``; ``dweight = sum_dy_xmu * invstd``, ``dbias = sum_dy``."""
        sum_dy, sum_dy_xmu = self.backward_reduce(dy, x, mean)
        dx = self.backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu)
        return dx, sum_dy, sum_dy_xmu

    def forward_train_act(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``act(BN(x))``: by default the fused forward, then the activation in place."""
        y, mean, var = self.forward_train(x, weight, bias, eps)
        return activations.apply_(y, act), mean, var

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
        """The backward of ``act(BN(x))``: ``dz = dy * act'(BN(x))`` (``BN(x)`` recomputed from
        ``x``), then :meth:`backward_train` on ``dz``; returns ``(dx, sum_dz, sum_dz_xmu)``."""
        z = self.apply(x, *affine_from_stats(mean, invstd, weight, bias))
        grad = activations.grad_from_input(z, act)
        dz = dy if grad is None else dy * grad
        return self.backward_train(dz, x, mean, invstd, weight)

    def forward_train_residual(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor, act: Activation
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``act(BN(x) + residual)`` for the identity, ReLU and LeakyReLU; returns ``(y, mean, var,
        mask)`` with the :mod:`sign_mask` of ``BN(x) + residual`` (``None`` for the identity).
        By default: the fused forward, the add, the mask and the activation in place."""
        y, mean, var = self.forward_train(x, weight, bias, eps)
        y.add_(residual)
        mask = None if act.name == "identity" else sign_mask.pack(y > 0, x)
        return activations.apply_(y, act), mean, var, mask

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
        """The backward of :meth:`forward_train_residual` (ReLU or LeakyReLU) from its mask:
        ``dz = dy * act'``; returns ``(dx, dresidual = dz, sum_dz, sum_dz_xmu)``."""
        positive = sign_mask.unpack(mask, x)
        dz = torch.where(positive, dy, dy * (0.0 if act.name == "relu" else act.param))
        dx, sum_dz, sum_dz_xmu = self.backward_train(dz, x, mean, invstd, weight)
        return dx, dz, sum_dz, sum_dz_xmu


def affine_from_stats(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``y = x * scale + shift`` equal to
    ``(x - mean) * invstd * weight + bias``; in the statistics' dtype."""
    scale = invstd if weight is None else invstd * (weight if weight.dtype == invstd.dtype else weight.to(invstd.dtype))
    if bias is None:
        return scale, -mean * scale
    return scale, torch.addcmul(bias if bias.dtype == invstd.dtype else bias.to(invstd.dtype), mean, scale, value=-1)
