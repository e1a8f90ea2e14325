"""How well a model's eval-mode normalization stands for its training-mode one (Wu & Johnson
2021, "Rethinking 'Batch' in BatchNorm").

In eval, a batch-norm layer normalizes with its running statistics, an estimate of the
population statistics of its input. Two things can go wrong, and each has a measure here:

* the estimate is off: :func:`statistics_error` compares every layer's running mean and
  variance with the exact moments of its input over data you give (the population, with
  the model's current weights; ``batchnorm.population_moments``);
* the network learned to work with *batch* statistics, which differ from the population's
  the more the smaller the batch: :func:`mode_gap` scores the model normalizing each batch
  of ``batch_size`` by its own statistics (training mode) and with the running statistics
  (eval mode), on the same samples.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from batchnorm.population import batch_norm_layers, population_moments

Tensor = torch.Tensor

__all__ = ["LayerStatisticsError", "ModeGap", "mode_gap", "statistics_error"]


@dataclass(frozen=True)
class LayerStatisticsError:
    """The running statistics of one batch-norm layer against the true moments of its input.

    With ``mu``, ``var`` the population mean and (biased) variance of a channel, ``r``, ``s``
    the layer's running mean and variance and ``eps`` its epsilon, each measure is an RMS over
    channels of:

    * ``mean_error``: ``(r - mu) / sqrt(var + eps)``, the mean's error in the channel's std;
    * ``std_error``: ``sqrt(s + eps) / sqrt(var + eps) - 1``, the std's relative error;
    * ``output_error``: the RMS over the population of the difference between the layer's
      normalized output (before ``weight`` and ``bias``) with ``r``, ``s`` and with ``mu``,
      ``var``, which is exactly ``(mu - r)^2 / (s + eps) + var * (1/sqrt(s + eps) -
      1/sqrt(var + eps))^2`` per channel. In units of the normalized activation: 0.1 means
      eval mode moves each normalized value by a tenth of its std, on average.
    """

    name: str
    count: int  # values per channel behind the population moments
    mean_error: float
    std_error: float
    output_error: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def statistics_error(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> list[LayerStatisticsError]:
    """How far each batch-norm layer's running statistics are from the exact moments of its
    input over ``batches`` (one :class:`LayerStatisticsError` per layer that saw values, in
    module order). The model is left exactly as it was.

    The moments are taken as :func:`batchnorm.precise_statistics` takes them: batch-norm
    layers in training mode, so the layers before each normalize with their batches'
    statistics; give large batches (or the whole set in one) for the population's. Give
    ``model.eval()`` to keep dropout off. ``batches``, ``num_batches``, ``device``: as for
    :func:`batchnorm.precise_statistics`.
    """
    moments = population_moments(model, batches, num_batches, device)
    out = []
    for name, layer in batch_norm_layers(model):
        m = moments[name]
        if m is None:
            continue
        r = layer.running_mean.detach().double().to(m.mean.device)
        s = layer.running_var.detach().double().to(m.mean.device)
        true_std = torch.sqrt(m.var + layer.eps)
        run_std = torch.sqrt(s + layer.eps)

        def rms(t: Tensor) -> float:
            return math.sqrt(float(t.pow(2).mean()))

        output_sq = (m.mean - r) ** 2 / (s + layer.eps) + m.var * (1 / run_std - 1 / true_std) ** 2
        out.append(LayerStatisticsError(name, m.count, rms((r - m.mean) / true_std), rms(run_std / true_std - 1),
                                        math.sqrt(float(output_sq.mean()))))  # fmt: skip
    return out


@dataclass(frozen=True)
class ModeGap:
    """A metric of the model on the same samples with batch statistics (each batch of
    ``batch_size`` normalized by its own, as in training) and with population statistics
    (eval mode: the running statistics)."""

    batch_size: int
    samples: int
    batch_statistics: float
    population_statistics: float

    @property
    def gap(self) -> float:
        """``batch_statistics - population_statistics``."""
        return self.batch_statistics - self.population_statistics

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap": self.gap}


@contextlib.contextmanager
def _batch_statistics(layers: list[nn.Module]) -> Iterator[None]:
    """Inside: the layers in training mode without a running update; afterwards as they were."""
    saved = [(layer, layer.training, layer.track_running_stats) for layer in layers]
    try:
        for layer in layers:
            layer.train()
            layer.track_running_stats = False
        yield
    finally:
        for layer, training, tracking in saved:
            layer.train(training)
            layer.track_running_stats = tracking


@torch.no_grad()
def mode_gap(
    model: nn.Module,
    metric: Callable[[Tensor, Tensor], Tensor | float],
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
) -> ModeGap:
    """``metric(outputs, targets)`` (a mean over the samples given, e.g. accuracy or a loss)
    with batch and with population statistics, on the first ``len(inputs) // batch_size *
    batch_size`` samples in consecutive batches of ``batch_size``, averaged over the batches.

    Everything but the batch-norm layers runs in eval mode (no dropout); the batch-norm layers
    normalize as they do in training (their own training forward: ghost batches, Batch Renorm's
    correction, ...) with their running update off. The model is left exactly as it was: its
    mode and its buffers. The gap is what eval mode changes for a network trained with that
    batch size: small when the running statistics stand for what training normalized with.
    """
    if batch_size < 2:
        raise ValueError(f"mode_gap: batch_size must be at least 2 (one value per channel has no variance), got "
                         f"{batch_size}")  # fmt: skip
    if len(inputs) != len(targets):
        raise ValueError(f"mode_gap: {len(inputs)} inputs but {len(targets)} targets")
    batches = len(inputs) // batch_size
    if batches == 0:
        raise ValueError(f"mode_gap: {len(inputs)} samples make no batch of {batch_size}")
    layers = [layer for _, layer in batch_norm_layers(model)]
    if not layers:
        raise ValueError("mode_gap: the model has no batch-norm layer with running statistics")
    was_training = model.training
    model.eval()
    try:
        population = _mean_metric(model, metric, inputs, targets, batch_size, batches)
        with _batch_statistics(layers):
            batch = _mean_metric(model, metric, inputs, targets, batch_size, batches)
    finally:
        model.train(was_training)
    return ModeGap(batch_size, batches * batch_size, batch, population)


def _mean_metric(model, metric, inputs: Tensor, targets: Tensor, batch_size: int, batches: int) -> float:
    total = 0.0
    for k in range(batches):
        chunk = slice(k * batch_size, (k + 1) * batch_size)
        total += float(metric(model(inputs[chunk]), targets[chunk]))
    return total / batches
