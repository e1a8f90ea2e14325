"""Population statistics beyond the running average: exact statistics pooled over many
batches (:func:`population_moments`, and :func:`precise_statistics`, which writes them into
the running buffers) and one running update per ``k`` micro-batches (:func:`accumulate`,
for gradient accumulation).

The running average a batch-norm layer keeps in training is an exponential average of
batch statistics taken while the weights moved; the statistics of the final weights over
the data are what eval needs (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm").
Under gradient accumulation the layer sees micro-batches, and its running statistics
come from them (pytorch#46516). Both functions here watch every batch-norm layer of a
model (``torch.nn``'s and ours, SyncBatchNorm included; any subclass of torch's
``_BatchNorm`` that keeps running buffers) through a forward pre-hook that takes each
training batch's per-channel count, mean and biased variance, pool them exactly with
``numerics.pooled`` (Chan's merge: batches of any size weigh by their size, not an
average of averages), and meanwhile switch the layers' own update off
(``track_running_stats=False`` in training: batch statistics, no update). A
SyncBatchNorm layer pools across the ranks of its process group too (one
``all_gather``), so every rank ends with the same buffers. Statistics are taken in at
least float32, as the layers' own, and merged in float64; a recomputation under
activation checkpointing is not counted twice (``running.recomputing``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._layout import reduce_dims
from .numerics import pooled, stats_dtype, unbiased
from .running import recomputing, update_running_stats

Tensor = torch.Tensor

__all__ = ["Moments", "accumulate", "population_moments", "precise_statistics"]


class _Pool:
    """One layer's training batches so far: count, mean and biased variance per channel
    (float64), merged batch by batch."""

    def __init__(self) -> None:
        self.count = 0
        self.batches = 0
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def add(self, x: Tensor) -> None:
        count = x.numel() // x.shape[1] if x.dim() >= 2 else 0
        if count == 0:
            return
        with torch.no_grad():
            x = x.detach()
            var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), reduce_dims(x), correction=0)
            mean, var = mean.double(), var.double()
        self.batches += 1
        if self.mean is None:
            self.count, self.mean, self.var = count, mean, var
            return
        counts = torch.tensor([[float(self.count)], [float(count)]], dtype=torch.float64, device=mean.device)
        self.mean, self.var, _ = pooled(torch.stack([self.mean, mean]), torch.stack([self.var, var]), counts)
        self.count += count

    def across_ranks(self, layer: nn.Module, channels: int, device: torch.device) -> None:
        """For a SyncBatchNorm layer in an initialized process group: every rank's pool merged."""
        if not _synchronized(layer):
            return
        from .sync import _all_gather

        group = layer.process_group if layer.process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        row = torch.zeros(2 * channels + 1, dtype=torch.float64, device=device)
        if self.mean is not None:
            row[:channels], row[channels:-1], row[-1] = self.mean, self.var, float(self.count)
        rows = _all_gather(row, group, world)
        mean, var, total = pooled(rows[:, :channels], rows[:, channels:-1], rows[:, -1:])
        self.count = round(float(total))
        self.mean, self.var = (mean, var) if self.count > 0 else (None, None)


def _synchronized(layer: nn.Module) -> bool:
    from .sync import SyncBatchNorm

    return (
        isinstance(layer, (nn.SyncBatchNorm, SyncBatchNorm))
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size(layer.process_group if layer.process_group is not None else dist.group.WORLD) > 1
    )


def batch_norm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """``(name, layer)`` of every batch-norm layer of ``model`` that keeps running statistics."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


@contextlib.contextmanager
def _watching(layers: list[nn.Module], on_batch) -> Iterator[None]:
    """Inside: each layer's own running update off, ``on_batch(layer, input)`` called for each of
    its training batches (not for a checkpointed forward's recomputation); afterwards the
    layers as they were."""
    saved = [(layer, layer.track_running_stats) for layer in layers]

    def hook(layer, args):
        if layer.training and args and not recomputing():
            on_batch(layer, args[0])

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        for layer in layers:
            layer.track_running_stats = False
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, tracking in saved:
            layer.track_running_stats = tracking


def _as_call(model: nn.Module, batch: Any, device) -> Any:
    """``model(batch)``, as ``torch.optim.swa_utils.update_bn`` calls it: a list or tuple gives
    its first element (``(inputs, targets)`` from a data loader), a dict its items as keywords."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        return model(**{k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in batch.items()})
    if device is not None:
        batch = batch.to(device)
    return model(batch)


@dataclass(frozen=True)
class Moments:
    """One layer's input over many batches: values per channel, and the mean and biased
    (population) variance of those values per channel, float64."""

    count: int
    mean: Tensor
    var: Tensor


def population_moments(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Moments | None]:
    """The exact per-channel moments of every batch-norm layer's input over ``batches``, by
    layer name (``None`` for a layer that saw no values); nothing of the model changes.

    The model runs without gradient with its batch-norm layers in training mode (each
    normalizes with its batch's statistics, as in training; their running update off) and
    every other module in the mode you gave it. Batches of any size weigh by their size.
    ``batches``, ``num_batches`` and ``device`` as for :func:`precise_statistics`, which is
    this followed by a copy into the running buffers; SyncBatchNorm layers pool across their
    process group.
    """
    return _moments(model, batches, num_batches, device, "population_moments")


def _moments(model, batches, num_batches, device, caller: str) -> dict[str, Moments | None]:
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no batch-norm layer with running statistics")
    pools = {layer: _Pool() for _, layer in layers}
    modes = [(layer, layer.training) for _, layer in layers]
    try:
        for _, layer in layers:
            layer.train()
        with _watching([layer for _, layer in layers], lambda layer, x: pools[layer].add(x)), torch.no_grad():
            for k, batch in enumerate(batches):
                if num_batches is not None and k >= num_batches:
                    break
                _as_call(model, batch, device)
    finally:
        for layer, training in modes:
            layer.train(training)
    out: dict[str, Moments | None] = {}
    for name, layer in layers:
        pool = pools[layer]
        pool.across_ranks(layer, layer.num_features, layer.running_mean.device)
        out[name] = None if pool.mean is None else Moments(pool.count, pool.mean, pool.var)
    return out


def precise_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, int]:
    """Replace every batch-norm layer's running mean and variance by the statistics of its
    input over ``batches``, pooled exactly (PreciseBN); returns the number of values per
    channel each layer saw, by layer name.

    The model runs without gradient, its weights untouched, with its batch-norm layers in
    training mode (each normalizes with its batch's statistics, as in training) and every
    other module in the mode you gave it (give ``model.eval()`` to keep dropout off). Each
    layer's ``running_mean`` becomes the mean of all the values it saw and ``running_var``
    their unbiased variance, whatever the batch sizes (not an average of per-batch
    averages); a layer that saw no values keeps its buffers; ``num_batches_tracked`` is
    left as it was. Afterwards each layer's mode, momentum and ``track_running_stats`` are
    as before. ``batches``: tensors, ``(inputs, ...)`` tuples (a data loader) or dicts of
    keyword arguments; ``num_batches``: stop after that many; ``device``: where to move
    the inputs. Works for ``torch.nn``'s layers and ours; SyncBatchNorm layers pool across
    their process group (every rank must call this with the same number of batches).
    This is also what ``torch.optim.swa_utils.update_bn`` does after SWA, computed exactly.
    """
    moments = _moments(model, batches, num_batches, device, "precise_statistics")
    layers = dict(batch_norm_layers(model))
    for name, m in moments.items():
        if m is None:
            continue
        with torch.no_grad():
            layers[name].running_mean.copy_(m.mean)
            layers[name].running_var.copy_(unbiased(m.var, m.count))
    return {name: 0 if m is None else m.count for name, m in moments.items()}


@contextlib.contextmanager
def accumulate(model: nn.Module, steps: int) -> Iterator[None]:
    """Gradient accumulation with the running statistics of the whole batch: inside the block,
    each batch-norm layer's running statistics are updated once per ``steps`` training
    micro-batches, with the statistics of those micro-batches pooled exactly, so they equal
    one update with the big batch they make up (its unbiased variance, one
    ``num_batches_tracked`` step, the layer's own ``momentum``).

    Normalization itself stays per micro-batch: each forward uses its own batch's
    statistics, as without the block (what the big batch would give needs the whole batch
    before the first output). On leaving the block, micro-batches not yet pooled (fewer
    than ``steps``) are pooled into one last update. A non-finite micro-batch makes its
    group non-finite: the layer's ``skip_nonfinite`` (ours) decides, as for one batch.
    SyncBatchNorm layers pool across their process group at each update.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"accumulate: steps must be a positive integer, got {steps!r}")
    layers = [layer for _, layer in batch_norm_layers(model)]
    pools = {layer: _Pool() for layer in layers}

    def flush(layer) -> None:
        pool = pools[layer]
        pool.across_ranks(layer, layer.num_features, layer.running_mean.device)
        if pool.mean is not None:
            update_running_stats(
                layer.running_mean, layer.running_var, pool.mean, pool.var, pool.count, layer.momentum,
                layer.num_batches_tracked, getattr(layer, "skip_nonfinite", False),
                getattr(layer, "num_nonfinite_batches", None),
            )  # fmt: skip
        pools[layer] = _Pool()

    def on_batch(layer, x) -> None:
        pools[layer].add(x)
        if pools[layer].batches == steps:
            flush(layer)

    with _watching(layers, on_batch):
        yield
    for layer in layers:  # a last, partial group
        if pools[layer].batches or _synchronized(layer):
            flush(layer)
