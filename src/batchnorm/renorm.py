"""Batch Renormalization (Ioffe 2017): ``BatchRenorm1d/2d/3d``.

In training a batch-norm layer's output depends on the batch it came with, and at
inference on the running averages instead; with small or non-i.i.d. batches the two
disagree. Batch Renorm keeps training's output on the running averages' scale:

    x̂ = (x - μ_B) / σ_B · r + d,   r = clip(σ_B / σ, 1/rmax, rmax),   d = clip((μ_B - μ) / σ, -dmax, dmax)

with ``σ_B = sqrt(var_B + eps)``, ``μ``/``σ = sqrt(running_var + eps)`` the running
estimates before this batch's update, and ``r``, ``d`` treated as constants by the
gradient. Then ``y = γ x̂ + β = BN_batch(x; weight = γ r, bias = β + γ d)``: the layer
is a batch norm with a per-batch weight and bias, so it takes the plain layer's path
(kernels, fused activation and residual, running update, every tool) with those, after
one statistics pass for ``r`` and ``d``. Eval is the batch norm's. ``rmax = 1,
dmax = 0`` gives ``r = 1, d = 0``, and weight and bias equal to ``γ``, ``β``: the
batch norm itself, to the bit.

``rmax``/``dmax`` are fixed, or follow the paper's schedule: ``1``/``0`` for
``warmup_steps`` training steps, then linear ramps to ``rmax`` over ``rmax_ramp_steps``
and to ``dmax`` over ``dmax_ramp_steps`` (the paper: 5k warm-up, then 35k and 20k).
The step is the ``renorm_step`` buffer (in the ``state_dict`` next to the batch norm's
own; a batch norm's checkpoint loads too, keeping the layer's step), counted on the
device without reading it back.
"""

from __future__ import annotations

import torch
from torch import fx

from . import _fx, _route, functional, kernels, modules
from ._layout import as_ncl, reduce_dims
from .numerics import invstd_of, stats_dtype
from .running import recomputing

Tensor = torch.Tensor

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _BatchRenorm:
    """Batch Renormalization over channel ``C`` of ``(N, C, *)``; see the module docstring.

    Args (beyond those of :class:`batchnorm.BatchNorm2d`, which it is):
        rmax: the bound of ``r``, at least 1 (1: no correction of the scale).
        dmax: the bound of ``|d|``, at least 0 (0: no correction of the shift).
        warmup_steps: training steps with ``rmax = 1, dmax = 0`` (plain batch norm).
        rmax_ramp_steps, dmax_ramp_steps: after the warm-up, steps over which the bound
            grows linearly to ``rmax`` (``dmax``); 0: at once.
    """

    __jit_unused_properties__ = ("freeze_affine", "scheduled")

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
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_ramp_steps: int = 0,
        dmax_ramp_steps: int = 0,
        **options,
    ) -> None:
        if not track_running_stats:
            raise ValueError("Batch Renorm corrects toward the running statistics: track_running_stats must be True")
        if options.get("virtual_batch_size") is not None:
            raise ValueError("Batch Renorm does not take virtual_batch_size (its correction is per batch)")
        if not rmax >= 1.0 or not dmax >= 0.0:
            raise ValueError(f"Batch Renorm needs rmax >= 1 and dmax >= 0, got rmax={rmax}, dmax={dmax}")
        for name, steps in (("warmup_steps", warmup_steps), ("rmax_ramp_steps", rmax_ramp_steps),
                            ("dmax_ramp_steps", dmax_ramp_steps)):  # fmt: skip
            if not isinstance(steps, int) or steps < 0:
                raise ValueError(f"Batch Renorm: {name} must be a non-negative integer, got {steps!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.rmax_ramp_steps, self.dmax_ramp_steps = warmup_steps, rmax_ramp_steps, dmax_ramp_steps
        self.register_buffer("renorm_step", torch.zeros((), dtype=torch.long, device=device))

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script; in eval it is a batch norm, so for "
            "inference freeze or fold it first: batchnorm.freeze(model.eval()) or batchnorm.fold(model.eval())"
        )

    @property
    def scheduled(self) -> bool:
        return bool(self.warmup_steps or self.rmax_ramp_steps or self.dmax_ramp_steps)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", rmax={self.rmax:g}, dmax={self.dmax:g}"
        if self.scheduled:
            text += (
                f", warmup_steps={self.warmup_steps}, rmax_ramp_steps={self.rmax_ramp_steps}, "
                f"dmax_ramp_steps={self.dmax_ramp_steps}"
            )
        return text

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # fmt: skip
        key = prefix + "renorm_step"
        if key not in state_dict:  # a batch norm's checkpoint: start the schedule where the layer is
            state_dict = {**state_dict, key: self.renorm_step}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip

    def bounds(self) -> tuple[Tensor | float, Tensor | float]:
        """``(rmax, dmax)`` at this step: the constants, or the schedule's (0-d tensors)."""
        if not self.scheduled:
            return self.rmax, self.dmax
        since = (self.renorm_step - self.warmup_steps).double()  # negative: still warming up

        def ramp(limit: float, start: float, steps: int) -> Tensor:
            share = (since / steps).clamp(0.0, 1.0) if steps else (since >= 0).double()
            return start + (limit - start) * share

        return ramp(self.rmax, 1.0, self.rmax_ramp_steps), ramp(self.dmax, 0.0, self.dmax_ramp_steps)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if isinstance(input, fx.Proxy):  # symbolic tracing: one call of this layer
            return _fx.record_call(self, input, residual)
        if not self.training or self.freeze_statistics:  # the batch norm's eval
            return super().forward(input, residual)
        self._check_input_dim(input)
        weight, bias = self._renormalized(input)
        y = functional.batch_norm(
            input, self.running_mean, self.running_var, weight, bias, True, self.momentum, self.eps,
            num_batches_tracked=self.num_batches_tracked, skip_nonfinite=self.skip_nonfinite,
            nonfinite_count=self.num_nonfinite_batches, activation=self.activation, residual=residual,
            memory_efficient=self.memory_efficient, inplace=self.inplace,
        )  # fmt: skip
        if not recomputing():
            self.renorm_step.add_(1)
        return y

    def _renormalized(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(γ r, β + γ d)`` for this batch (``r``, ``d`` without gradient)."""
        mean_b, var_b = _batch_statistics(x)
        rmax, dmax = self.bounds()
        with torch.no_grad():
            sdtype = mean_b.dtype
            if torch.is_tensor(rmax):
                rmax, dmax = rmax.to(sdtype), dmax.to(sdtype)
            invstd = invstd_of(self.running_var.to(sdtype), self.eps)  # 1 / σ
            r = torch.clamp(invstd / invstd_of(var_b, self.eps), 1.0 / rmax, rmax)  # σ_B / σ
            d = torch.clamp((mean_b - self.running_mean.to(sdtype)) * invstd, -dmax, dmax)
        weight, bias = self.weight, self.bias
        pdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else sdtype)
        r, d = r.to(pdtype), d.to(pdtype)
        new_weight = r if weight is None else weight * r
        new_bias = d if weight is None else weight * d
        return new_weight, new_bias if bias is None else bias + new_bias


def _batch_statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's per-channel mean and biased variance, without gradient, in the statistics
    dtype: the backend's statistics pass (torch's ops under tools that follow only them)."""
    with torch.no_grad():
        x = x.detach()
        if x.numel() == 0 or _route.tool_needs_torch_ops() or torch.compiler.is_compiling():
            var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), reduce_dims(x), correction=0)
            return mean, var
        x3 = as_ncl(x)
        mean, var = kernels.select(x3).stats(x3)
        return mean, var


class BatchRenorm1d(_BatchRenorm, modules.BatchNorm1d):
    """Batch Renorm over ``(N, C)`` or ``(N, C, L)``; see :mod:`batchnorm.renorm`."""


class BatchRenorm2d(_BatchRenorm, modules.BatchNorm2d):
    """Batch Renorm over ``(N, C, H, W)`` (contiguous or channels-last); see :mod:`batchnorm.renorm`."""


class BatchRenorm3d(_BatchRenorm, modules.BatchNorm3d):
    """Batch Renorm over ``(N, C, D, H, W)``; see :mod:`batchnorm.renorm`."""
