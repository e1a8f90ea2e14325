"""Inference-time measurements: batch versus population statistics, and the folded layer.

``batch_stats_predictions`` predicts with every BN layer normalizing by the
statistics of the batch at hand (what training mode computes), which for one
image at a time is what a network would do if it kept using batch statistics
at inference. ``with_precise_statistics`` recomputes the running statistics over data, on a copy.
``fold_batchnorm`` replaces every BN layer by its eval-mode
multiply-add ``y = x * scale + shift`` (``batchnorm.freeze``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from batchnorm.fold import freeze
from batchnorm.population import precise_statistics

__all__ = ["PRECISE_CHUNK", "batch_stats_predictions", "fold_batchnorm", "predictions", "with_precise_statistics"]

PRECISE_CHUNK = 256  # training images per batch of an exact statistics pass

_BN = nn.modules.batchnorm._BatchNorm


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose BN layers are each one multiply-add
    (:func:`batchnorm.freeze`); they must track running statistics."""
    return freeze(copy.deepcopy(model).eval())


def with_precise_statistics(model: nn.Module, x: torch.Tensor, chunk: int = PRECISE_CHUNK) -> nn.Module:
    """A copy of ``model`` in eval mode whose running statistics are recomputed exactly over ``x``
    (``batchnorm.precise_statistics``), ``chunk`` images per batch."""
    copied = copy.deepcopy(model).eval()
    precise_statistics(copied, [x[i : i + chunk] for i in range(0, len(x), chunk)])
    return copied


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Class predictions in eval mode (population statistics), ``batch_size`` images at a time."""
    was_training = model.training
    model.eval()
    try:
        step = batch_size or len(x)
        return torch.cat([model(x[i : i + step]).argmax(-1) for i in range(0, len(x), step)])
    finally:
        model.train(was_training)


def _batch_stats_hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    # training-mode normalization without touching the running statistics; for one
    # example per channel the variance is 0 and x - mean is 0, so the output is beta
    x = args[0]
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, correction=0)
    y = (x - mean) / torch.sqrt(var + module.eps)
    if module.weight is not None:
        view = (1, -1) + (1,) * (x.dim() - 2)
        y = y * module.weight.view(view)
        if module.bias is not None:
            y = y + module.bias.view(view)
    return y


@torch.no_grad()
def batch_stats_predictions(model: nn.Module, x: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """Predictions with each BN layer normalizing by the current batch's own statistics.

    torch's layers (and ours) refuse training mode with one value per channel,
    so this runs the model in eval mode with a forward hook on each BN layer
    that recomputes its output from the batch's mean and biased variance; the
    running statistics are not touched.
    """
    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(_batch_stats_hook) for m in model.modules() if isinstance(m, _BN)]
    try:
        return torch.cat([model(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
