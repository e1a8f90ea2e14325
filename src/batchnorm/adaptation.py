"""Test-time adaptation through batch norm: a trained model meets data from a shifted
distribution (new sensor, weather, corruption) with no labels.

* **Statistics** (AdaBN, Li et al. 2016; "BN adapt" in Schneider et al. 2020): every
  batch-norm layer's running statistics recomputed on the new data
  (:func:`batchnorm.precise_statistics`), the weights untouched. A shift and scale of a
  layer's input per channel is undone exactly by its normalization.
* **Affine** (TENT, Wang et al. 2021): the layers' ``weight`` and ``bias`` (γ, β) also
  learn, by minimizing the entropy of the model's predictions on the new data, with the
  layers normalizing with each batch's statistics (as TENT does); every other parameter
  stays fixed. Then the statistics are recomputed with the adapted γ, β, so the model
  comes out ready for eval on the new data, as a model with population statistics.

TENT as published adapts online (predict a batch, then step on it); :func:`adapt` runs
the steps over ``batches`` first and hands back an eval-ready model: the offline form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .population import _as_call, batch_norm_layers, precise_statistics

Tensor = torch.Tensor

__all__ = ["adapt", "entropy"]


def entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the batch (classes on dim 1)."""
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1).mean()


def adapt(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    affine: bool = False,
    steps: int = 1,
    lr: float = 1e-3,
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Adapt ``model``'s batch-norm layers (torch's and ours) to the distribution of ``batches``
    (unlabeled; tensors, ``(inputs, ...)`` tuples or keyword dicts, as for
    :func:`batchnorm.precise_statistics`), in place.

    ``affine=False``: the running statistics become those of the new data (AdaBN).
    ``affine=True``: first ``steps`` passes over ``batches`` (each pass at most
    ``num_batches``), one optimizer step per batch on the entropy of the predictions with
    respect to the layers' ``weight`` and ``bias`` only, normalizing with batch statistics
    (TENT); ``optimizer(params)`` builds the optimizer (default: Adam at ``lr``, TENT's
    setting for CIFAR). Then the statistics as above. ``batches`` is iterated again for
    each pass, so give a re-iterable (a list, a data loader).

    The modes and ``requires_grad`` of every module and parameter are restored. Returns,
    with ``affine``, ``{"entropy_before": ..., "entropy_after": ...}``: the mean entropy of
    the predictions over the batches before and after the steps (batch statistics in the
    batch norms, as during the steps); without, ``{}``.
    """
    layers = [layer for _, layer in batch_norm_layers(model)]
    if not layers:
        raise ValueError("adapt: the model has no batch-norm layer with running statistics")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"adapt: steps must be a positive integer, got {steps!r}")
    report: dict[str, float] = {}
    if affine:
        report = _entropy_minimization(model, layers, batches, steps, lr, optimizer, num_batches, device)
    precise_statistics(model, batches, num_batches=num_batches, device=device)
    return report


def _entropy_minimization(model, layers, batches, steps, lr, optimizer, num_batches, device) -> dict[str, float]:
    """TENT's loop: batch statistics in the batch norms (their running ones untouched), γ and β
    learning, everything else frozen; everything as it was afterwards."""
    params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    if not params:
        raise ValueError("adapt(affine=True): the batch-norm layers have no weight or bias (affine=False)")
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    states = [(layer, layer.training, layer.track_running_stats) for layer in layers]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))

    def each_batch():
        for k, batch in enumerate(batches):
            if num_batches is not None and k >= num_batches:
                return
            yield batch

    def mean_entropy() -> float:
        with torch.no_grad():
            values = [float(entropy(_as_call(model, batch, device))) for batch in each_batch()]
        return sum(values) / max(len(values), 1)

    try:
        for p, _ in trainable:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for layer in layers:
            layer.train()
            layer.track_running_stats = False  # batch statistics, running ones untouched
        before = mean_entropy()
        for _ in range(steps):
            for batch in each_batch():
                loss = entropy(_as_call(model, batch, device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        after = mean_entropy()
    finally:
        opt.zero_grad(set_to_none=True)
        for p, flag in trainable:
            p.requires_grad_(flag)
        for layer, training, tracking in states:
            layer.train(training)
            layer.track_running_stats = tracking
    return {"entropy_before": before, "entropy_after": after}
