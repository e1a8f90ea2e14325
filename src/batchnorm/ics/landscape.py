"""What Santurkar et al. (2018) found batch norm changes instead of covariate shift: the
smoothness of the loss (their Figure 4). :func:`loss_landscape` probes the loss and its
gradient along the gradient from the current parameters: the range of the loss, the
gradient's change (predictiveness) and the effective beta-smoothness.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._snapshot import Snapshot, loss_and_gradients

Tensor = torch.Tensor

__all__ = ["LandscapeProbe", "loss_landscape"]


@dataclass
class LandscapeProbe:
    """The loss and its gradient probed along the gradient from one point (Santurkar et al. 2018,
    Figure 4): at each step size ``eta`` the parameters ``theta - eta * g`` (``g`` the gradient at
    ``theta``) give the loss ``losses[k]`` and a gradient that differs from ``g`` by
    ``gradient_changes[k]`` (l2 norm over all parameters)."""

    step_sizes: list[float]
    loss: float  # at theta
    grad_norm: float  # ||g||
    losses: list[float]
    gradient_changes: list[float]

    @property
    def loss_range(self) -> float:
        """Max minus min of the loss over the probed points, ``theta`` included."""
        values = [self.loss, *self.losses]
        return max(values) - min(values)

    @property
    def gradient_predictiveness(self) -> float:
        """The largest change of the gradient along the step (smaller: the gradient at ``theta``
        predicts the gradient further along better)."""
        return max(self.gradient_changes)

    @property
    def beta_smoothness(self) -> float:
        """Effective beta-smoothness: the largest gradient change per unit distance moved,
        ``max_k gradient_changes[k] / (eta_k * ||g||)``."""
        return max(c / (eta * self.grad_norm) for c, eta in zip(self.gradient_changes, self.step_sizes, strict=True))

    def as_dict(self) -> dict[str, Any]:
        measures = ("loss_range", "gradient_predictiveness", "beta_smoothness")
        return {**asdict(self), **{name: getattr(self, name) for name in measures}}


def loss_landscape(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    step_sizes: Sequence[float],
) -> LandscapeProbe:
    """Probe ``loss_fn(model(inputs), targets)`` along its gradient from the model's current
    parameters, one point per step size (Santurkar et al. 2018, Figure 4: with batch norm the
    loss changes less, and its gradient more predictably, along the gradient).

    Every point uses the same batch and the same parameters to start from (not successive
    training steps). The model is left exactly as it was: parameters, ``.grad`` fields,
    buffers (running statistics) and train/eval mode. At least one step size, each positive.
    """
    steps = [float(eta) for eta in step_sizes]
    if not steps or not all(math.isfinite(eta) and eta > 0 for eta in steps):
        raise ValueError(f"loss_landscape needs positive, finite step sizes, got {list(step_sizes)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("loss_landscape found no trainable parameters")
    snapshot = Snapshot(model, params)
    try:
        loss, g = loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot)
        g = [t.detach().clone() for t in g]
        grad_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
        losses, changes = [], []
        for eta in steps:
            with torch.no_grad():
                for p, p0, gp in zip(params, snapshot.params, g, strict=True):
                    p.copy_(p0 - eta * gp)
            moved_loss, moved = loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot)
            losses.append(moved_loss)
            changes.append(math.sqrt(sum(float((a - b).double().pow(2).sum()) for a, b in zip(moved, g, strict=True))))
        return LandscapeProbe(steps, loss, grad_norm, losses, changes)
    finally:
        snapshot.restore()
