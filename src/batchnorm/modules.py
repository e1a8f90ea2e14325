"""Drop-in ``BatchNorm1d/2d/3d`` layers.

Each is a subclass of the matching ``torch.nn`` class, so ``isinstance``
checks, ``state_dict`` keys, buffers, ``repr``, ``reset_*`` and old-checkpoint
loading behave exactly as torch's; only ``forward`` is ours (it calls
:func:`batchnorm.functional.batch_norm`), plus protection of the running
statistics against non-finite batches, a fused activation and residual add,
and a memory-saving mode.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from . import _fx, _ghost, _torch_ops, activations, functional
from .activations import Activation

Tensor = torch.Tensor

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNorm:
    r"""Batch normalization (Ioffe & Szegedy, 2015) over channel ``C`` of ``(N, C, *)``.

    Training: each channel is normalized with the mini-batch mean and biased
    variance taken over the batch and every spatial position, then scaled and
    shifted by the learned ``weight`` (gamma) and ``bias`` (beta):

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    and the running estimates move toward the batch's statistics:
    ``running = (1 - momentum) * running + momentum * batch`` (``momentum`` is
    the weight of the new batch, as in torch; ``momentum=None`` keeps a
    cumulative average), with the unbiased variance for ``running_var``.
    Eval: the running estimates replace the batch's, and the whole layer is one
    per-channel multiply-add, ``y = x * scale + shift``.

    Args:
        num_features: ``C``.
        eps: added to the variance for stability.
        momentum: weight of the new batch in the running estimates, or ``None``.
        affine: learn ``weight`` and ``bias``.
        track_running_stats: keep running estimates and use them in eval.
        bias: with ``affine``, whether to learn the shift too.
        skip_nonfinite: a training batch whose statistics hold NaN/Inf leaves the
            running estimates (and ``num_batches_tracked``) unchanged, and is
            counted in the ``num_nonfinite_batches`` buffer (not saved in the
            ``state_dict``). ``False`` restores torch's behaviour.
        activation: fused after the normalization (and after the residual add,
            ``forward(x, residual)``): ``None``/``"identity"``, ``"relu"``,
            ``"leaky_relu"`` or ``("leaky_relu", slope)``, ``"elu"`` or
            ``("elu", alpha)``, ``"silu"``, or the matching ``torch.nn`` module.
            The ``state_dict`` stays that of a plain batch-norm layer.
        memory_efficient: in training keep only the output for the backward and
            recompute the rest from it (invertible activations only; every
            ``weight`` must be non-zero; no residual).
        inplace: write the output over the input and return the input, as
            torch's in-place modules do. In training with autograd the input
            is then gone, so the backward works from the output alone, as with
            ``memory_efficient=True`` (an invertible activation, non-zero
            weights, no residual; the layer says so otherwise).
        freeze_statistics: for fine-tuning (mmdetection's ``norm_eval``): in
            training mode too, normalize with the running statistics, as in
            eval, and never update them; ``model.train()`` does not undo it.
        freeze_affine: ``weight`` and ``bias`` do not learn (``requires_grad``
            off; setting the attribute later turns it back on or off).
        virtual_batch_size: ghost batch norm: in training, statistics per ghost
            batch of this many samples (the last may be smaller), ``weight``
            and ``bias`` shared; the running statistics move toward the average
            of the ghosts' statistics. ``None``: the whole batch (see
            ``batchnorm._ghost``).
    """

    __jit_unused_properties__ = ("freeze_affine",)  # (TorchScript compiles forward, not this)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        skip_nonfinite: bool = True,
        activation: str | tuple[str, float] | nn.Module | Activation | None = None,
        memory_efficient: bool = False,
        inplace: bool = False,
        freeze_statistics: bool = False,
        freeze_affine: bool = False,
        virtual_batch_size: int | None = None,
    ) -> None:
        _ghost.check_size(virtual_batch_size)
        if freeze_statistics and not track_running_stats:
            raise ValueError("freeze_statistics=True normalizes with the running statistics: it needs "
                             "track_running_stats=True")  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.skip_nonfinite = skip_nonfinite
        self.activation = activations.parse(activation)
        if memory_efficient and not self.activation.invertible:
            raise ValueError(
                "memory_efficient=True needs an invertible activation (identity, leaky_relu with a positive "
                f"slope, elu with a positive alpha) to recover the input from the output; got {self.activation}"
            )
        self.memory_efficient = memory_efficient
        self.inplace = inplace
        counter = torch.zeros((), dtype=torch.long, device=device) if track_running_stats else None
        self.register_buffer("num_nonfinite_batches", counter, persistent=False)
        self.freeze_statistics = freeze_statistics
        self.virtual_batch_size = virtual_batch_size
        if freeze_affine:
            self.freeze_affine = True

    @property
    def freeze_affine(self) -> bool:
        """Whether ``weight`` and ``bias`` are kept from learning (``requires_grad`` off); setting it
        sets their ``requires_grad``."""
        params = [p for p in (self.weight, self.bias) if p is not None]
        return bool(params) and not any(p.requires_grad for p in params)

    @freeze_affine.setter
    def freeze_affine(self, value: bool) -> None:
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(not value)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "num_nonfinite_batches", None) is not None:
            self.num_nonfinite_batches.zero_()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation != activations.IDENTITY:
            text += f", activation={self.activation}"
        if self.memory_efficient:
            text += ", memory_efficient=True"
        if self.inplace:
            text += ", inplace=True"
        if self.freeze_statistics:
            text += ", freeze_statistics=True"
        if self.freeze_affine:
            text += ", freeze_affine=True"
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        return text if self.skip_nonfinite else text + ", skip_nonfinite=False"

    def forward(self, input: Tensor, residual: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``act(BN(input) + residual)``; ``mask`` (boolean, ``input``'s shape without dim 1): batch
        norm over the positions where it is ``True``, 0 at the others (padded sequences)."""
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's ops, our semantics
            if mask is not None or self.virtual_batch_size is not None:
                raise RuntimeError("mask= and virtual_batch_size are not supported under TorchScript")
            self._check_input_dim(input)
            running_mean, running_var, counter, nonfinite, batch_stats = self._call_buffers()
            return _torch_ops.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, batch_stats, self.momentum, self.eps,
                counter, self.skip_nonfinite, nonfinite, self.activation[0], self.activation[1], residual,
            )  # fmt: skip
        if isinstance(input, fx.Proxy):  # symbolic tracing: one call of this layer, as for torch's
            return _fx.record_call(self, input, residual, mask)
        self._check_input_dim(input)
        running_mean, running_var, counter, nonfinite, batch_stats = self._call_buffers()
        return functional.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, batch_stats, self.momentum, self.eps,
            num_batches_tracked=counter, skip_nonfinite=self.skip_nonfinite, nonfinite_count=nonfinite,
            activation=self.activation, residual=residual, memory_efficient=self.memory_efficient,
            inplace=self.inplace, mask=mask, virtual_batch_size=self.virtual_batch_size,
        )  # fmt: skip

    def _call_buffers(self) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, bool]:
        """``(running_mean, running_var, num_batches_tracked, nonfinite_count, use_batch_stats)`` for
        the functional call, as torch's layer decides them: the running buffers are passed where
        they are updated (training) or used (eval), counted only where updated; batch statistics
        in training, or in eval when there are no running buffers. ``freeze_statistics``: training
        as eval."""
        learning = self.training and not self.freeze_statistics
        update = learning and self.track_running_stats
        pass_buffers = not learning or self.track_running_stats
        batch_stats = learning or (self.running_mean is None and self.running_var is None)
        return (
            self.running_mean if pass_buffers else None,
            self.running_var if pass_buffers else None,
            self.num_batches_tracked if update else None,
            self.num_nonfinite_batches if update else None,
            batch_stats,
        )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch norm over ``(N, C)`` (per feature) or ``(N, C, L)`` (per channel, over N and L).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``
        - Output: same shape as the input
    """


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch norm per channel of ``(N, C, H, W)``, over N, H and W.

    Shape:
        - Input: ``(N, C, H, W)``, contiguous or channels-last
        - Output: same shape and memory format as the input
    """


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch norm per channel of ``(N, C, D, H, W)``, over N, D, H and W.

    Shape:
        - Input: ``(N, C, D, H, W)``, contiguous or channels-last-3d
        - Output: same shape and memory format as the input
    """
