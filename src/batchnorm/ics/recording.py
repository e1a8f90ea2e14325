"""The distribution view of internal covariate shift: :class:`InputRecorder` follows the
input distribution of chosen layers over training (per-feature mean and std, percentiles
of one unit, drift from record to record; Ioffe & Szegedy 2015, Figure 1), and
:func:`plot_percentiles` draws what it kept.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["InputRecorder", "LayerHistory", "plot_percentiles"]


@dataclass
class LayerHistory:
    """What :class:`InputRecorder` kept for one layer, one entry per record."""

    steps: list[int] = field(default_factory=list)
    mean: list[np.ndarray] = field(default_factory=list)  # per record: C
    std: list[np.ndarray] = field(default_factory=list)  # per record: C
    percentiles: list[np.ndarray] = field(default_factory=list)  # per record: P (of the tracked unit)
    count: list[int] = field(default_factory=list)  # values per feature behind each record


class InputRecorder:
    """Record the input distribution of chosen modules while a model trains.

    Forward pre-hooks see each module's first input; only the forwards run inside
    :meth:`recording` (or :meth:`record`) are kept, so the training loop itself is
    never slowed down or changed. Statistics are per feature along ``channel_dim``
    (dimension 1: the feature of a ``B x N`` input, the channel of ``B x C x ...``),
    reduced over every other dimension; the percentiles are those of the values of
    one unit (feature/channel ``unit``), as in the paper's Figure 1.

    Args:
        modules: name -> module whose *input* to record (e.g. the activations, to
            see what a nonlinearity receives).
        unit: index of the feature whose percentiles are kept, one for all modules
            or a mapping name -> index.
        percentiles: which percentiles, in 0..100.

    Example::

        rec = InputRecorder({"sigmoid3": model[8]}, percentiles=(15, 50, 85))
        for step in range(steps):
            ...  # ordinary training step
            if step % 50 == 0:
                rec.record(step, model, probe_inputs)  # no_grad, mode unchanged
        rec.save_json("inputs.json"); rec.detach()
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        unit: int | Mapping[str, int] = 0,
        percentiles: Sequence[float] = (15, 50, 85),
    ) -> None:
        if not modules:
            raise ValueError("InputRecorder needs at least one module to watch")
        if any(not 0 <= p <= 100 for p in percentiles):
            raise ValueError(f"percentiles must lie in 0..100, got {list(percentiles)}")
        self.percentiles = tuple(float(p) for p in percentiles)
        self.units = {name: unit[name] if isinstance(unit, Mapping) else int(unit) for name in modules}
        self.history: dict[str, LayerHistory] = {name: LayerHistory() for name in modules}
        self._pending: dict[str, list[Tensor]] | None = None
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._pending is None or not args or not isinstance(args[0], Tensor):
                return
            x = args[0].detach()
            if x.dim() < 2:
                raise ValueError(f"{name}: expected an input with a feature dimension, got shape {tuple(x.shape)}")
            # C x (everything else): one row per feature
            self._pending[name].append(x.movedim(1, 0).reshape(x.shape[1], -1).to("cpu", torch.float64))

        return hook

    @contextlib.contextmanager
    def recording(self, step: int) -> Iterator[None]:
        """Keep the inputs of every forward run in this block as the record for ``step``.

        Several forwards in one block are pooled into one record.
        """
        if self._pending is not None:
            raise RuntimeError("InputRecorder.recording blocks cannot be nested")
        self._pending = {name: [] for name in self.history}
        try:
            yield
            for name, chunks in self._pending.items():
                if chunks:
                    self._store(name, step, torch.cat(chunks, dim=1))
        finally:
            self._pending = None

    @torch.no_grad()
    def record(self, step: int, model: nn.Module, inputs: Tensor) -> None:
        """Run ``model(inputs)`` without gradients, as it is (train or eval), and record it.

        In training mode batch-norm layers would update their running statistics
        on this probe batch; put the model in eval mode first to avoid that.
        """
        with self.recording(step):
            model(inputs)

    def _store(self, name: str, step: int, values: Tensor) -> None:
        unit = self.units[name]
        if not -values.shape[0] <= unit < values.shape[0]:
            raise IndexError(f"{name}: unit {unit} out of range for {values.shape[0]} features")
        h = self.history[name]
        h.steps.append(int(step))
        h.mean.append(values.mean(dim=1).numpy())
        h.std.append(values.std(dim=1, correction=0).numpy())
        q = torch.tensor(self.percentiles, dtype=torch.float64) / 100
        h.percentiles.append(torch.quantile(values[unit], q).numpy())
        h.count.append(int(values.shape[1]))

    def detach(self) -> None:
        """Remove the hooks (what was recorded stays)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def drift(self, name: str, *, against: str = "previous") -> dict[str, np.ndarray]:
        """How far the input distribution moved, per record.

        For each record, the root mean square over features of the change of the
        per-feature mean and of the per-feature std, relative to the previous
        record (``against="previous"``) or to the first (``against="first"``).
        The first record's drift is 0.
        """
        if against not in ("previous", "first"):
            raise ValueError(f"against must be 'previous' or 'first', got {against!r}")
        h = self.history[name]
        if not h.steps:
            return {"steps": np.zeros(0, int), "mean_shift": np.zeros(0), "std_shift": np.zeros(0)}
        mean, std = np.stack(h.mean), np.stack(h.std)  # R,C
        ref_mean = np.concatenate([mean[:1], mean[:-1]]) if against == "previous" else mean[:1]
        ref_std = np.concatenate([std[:1], std[:-1]]) if against == "previous" else std[:1]
        return {
            "steps": np.asarray(h.steps),
            "mean_shift": np.sqrt(((mean - ref_mean) ** 2).mean(axis=1)),
            "std_shift": np.sqrt(((std - ref_std) ** 2).mean(axis=1)),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything recorded, as plain lists (JSON-ready)."""
        out: dict[str, Any] = {"percentiles": list(self.percentiles), "layers": {}}
        for name, h in self.history.items():
            d = self.drift(name)
            out["layers"][name] = {
                "unit": self.units[name],
                "steps": list(h.steps),
                "count": list(h.count),
                "unit_percentiles": [p.tolist() for p in h.percentiles],
                "feature_mean": [m.tolist() for m in h.mean],
                "feature_std": [s.tolist() for s in h.std],
                "drift_mean_shift": d["mean_shift"].tolist(),
                "drift_std_shift": d["std_shift"].tolist(),
            }
        return out

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


def plot_percentiles(
    recorder: InputRecorder, name: str, ax: Any = None, *, label: str = "", color: Any = None, after: int | None = None
):
    """Draw the recorded percentiles of ``name``'s tracked unit against the step (records after
    step ``after`` only, if given).

    The middle percentile is a line, the outer ones a band. Returns the axes.
    """
    import matplotlib.pyplot as plt

    ax = ax if ax is not None else plt.gca()
    h = recorder.history[name]
    keep = [i for i, step in enumerate(h.steps) if after is None or step > after]
    if not keep:
        return ax
    steps = [h.steps[i] for i in keep]
    p = np.stack([h.percentiles[i] for i in keep])  # R,P
    mid = p.shape[1] // 2
    names = "/".join(f"{q:g}" for q in recorder.percentiles)
    (line,) = ax.plot(steps, p[:, mid], color=color, label=f"{label} {names}th pct".strip())
    for lo in range(mid):
        ax.fill_between(steps, p[:, lo], p[:, -1 - lo], color=line.get_color(), alpha=0.2, linewidth=0)
        ax.plot(steps, p[:, lo], color=line.get_color(), linewidth=0.6)
        ax.plot(steps, p[:, -1 - lo], color=line.get_color(), linewidth=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel(f"input to {name} (unit {recorder.units[name]})")
    return ax
