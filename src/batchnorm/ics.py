"""Measuring internal covariate shift (ICS) on any model.

Two views of it: :class:`InputRecorder` follows the *distribution* of chosen
layers' inputs over training (per-feature mean and std, percentiles of one unit,
drift from record to record; Ioffe & Szegedy 2015, Figure 1), and
:func:`gradient_ics` measures the *gradient* change a layer sees when the layers
before it take their step (Santurkar et al. 2018, Definition 2.1).

And what Santurkar et al. found batch norm changes instead, the smoothness of the loss
(their Figure 4): :func:`loss_landscape` probes the loss and its gradient along the
gradient from the current parameters (the range of the loss, the gradient's change, the
effective beta-smoothness).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Tensor = torch.Tensor

__all__ = [
    "InputRecorder", "LandscapeProbe", "LayerHistory", "LayerICS", "gradient_ics", "loss_landscape", "plot_ics",
    "plot_percentiles",
]  # fmt: skip


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


@dataclass(frozen=True)
class LayerICS:
    """Gradient ICS of one layer at one step: ``G`` before, ``G'`` after the upstream update."""

    name: str
    grad_norm: float  # ||G||
    shifted_grad_norm: float  # ||G'||
    diff_norm: float  # ||G - G'||
    cosine: float  # cos(G, G'); nan when either is zero

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_layers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def gradient_ics(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    lr: float | None = None,
    next_params: Mapping[nn.Parameter, Tensor] | None = None,
    layers: Mapping[str, nn.Module] | None = None,
) -> list[LayerICS]:
    """Gradient-based internal covariate shift for one step (Santurkar et al. 2018, Def. 2.1).

    For each layer ``i`` (in order), ``G`` is the gradient of
    ``loss_fn(model(inputs), targets)`` w.r.t. the layer's ``weight`` with every
    parameter as it is now, and ``G'`` the same gradient on the same batch after
    the *upstream* parameters have taken this step: those that come before the
    layer's weight in ``model.parameters()`` order (for a sequential model: the
    earlier layers, their biases and their batch-norm scale/shift). The step is
    plain SGD with ``lr`` on the gradient of this batch, or the values given in
    ``next_params`` (parameter -> value after the step, for any other optimizer).

    Call it before ``optimizer.step()`` with the batch the step uses. The model is
    left exactly as it was: parameters, ``.grad`` fields, buffers (running
    statistics) and train/eval mode. Dropout or other randomness in the forward
    would make ``G`` and ``G'`` differ for other reasons; avoid it here.

    Args:
        layers: name -> module with a ``weight``; by default every Linear/Conv
            module, in registration order.

    Returns:
        One :class:`LayerICS` per layer. The first layer has no upstream
        parameters, so ``G' == G`` there.
    """
    if (lr is None) == (next_params is None):
        raise ValueError("gradient_ics needs exactly one of lr= (plain SGD) or next_params=")
    layers = dict(_default_layers(model) if layers is None else layers)
    if not layers:
        raise ValueError("gradient_ics found no layers with weights to measure")
    params = [p for p in model.parameters() if p.requires_grad]
    position = {id(p): k for k, p in enumerate(params)}
    for name, module in layers.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) not in position:
            raise ValueError(f"layer {name!r} has no trainable weight among the model's parameters")

    snapshot = _Snapshot(model, params)

    def gradients() -> tuple[Tensor, ...]:
        return _loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot)[1]

    saved_params = snapshot.params
    try:
        g_now = gradients()
        if next_params is None:
            after = [p0 - lr * g for p0, g in zip(saved_params, g_now, strict=True)]
        else:
            lookup = {id(p): v for p, v in next_params.items()}
            after = [
                lookup[id(p)].detach() if id(p) in lookup else p0 for p, p0 in zip(params, saved_params, strict=True)
            ]
        results = []
        for name, module in layers.items():
            k = position[id(module.weight)]
            g = g_now[k]
            with torch.no_grad():
                for j, p in enumerate(params):
                    p.copy_(after[j] if j < k else saved_params[j])
            g_shift = gradients()[k] if k > 0 else g
            results.append(_compare(name, g, g_shift))
        return results
    finally:
        snapshot.restore()


class _Snapshot:
    """A model's parameters ``params`` and buffers as they are now, to put back after probing."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.model, self.live = model, params
        self.params = [p.detach().clone() for p in params]
        self.buffers = [b.detach().clone() for b in model.buffers()]

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), self.buffers, strict=True):
                b.copy_(saved)

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.live, self.params, strict=True):
                p.copy_(saved)
        self.restore_buffers()


def _loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot: _Snapshot) -> tuple[float, tuple]:
    """The loss on the batch and its gradient w.r.t. ``params`` (zeros for unused ones); the
    buffers a training-mode forward moved (running statistics) are put back."""
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    snapshot.restore_buffers()
    return loss.item(), tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True))


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
    snapshot = _Snapshot(model, params)
    try:
        loss, g = _loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot)
        g = [t.detach().clone() for t in g]
        grad_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g))
        losses, changes = [], []
        for eta in steps:
            with torch.no_grad():
                for p, p0, gp in zip(params, snapshot.params, g, strict=True):
                    p.copy_(p0 - eta * gp)
            moved_loss, moved = _loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot)
            losses.append(moved_loss)
            changes.append(math.sqrt(sum(float((a - b).double().pow(2).sum()) for a, b in zip(moved, g, strict=True))))
        return LandscapeProbe(steps, loss, grad_norm, losses, changes)
    finally:
        snapshot.restore()


def _compare(name: str, g: Tensor, g_shift: Tensor) -> LayerICS:
    g, g_shift = g.double().flatten(), g_shift.double().flatten()
    norm, norm_shift = g.norm().item(), g_shift.norm().item()
    cosine = (g @ g_shift).item() / (norm * norm_shift) if norm > 0 and norm_shift > 0 else math.nan
    return LayerICS(name, norm, norm_shift, (g - g_shift).norm().item(), cosine)


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


def plot_ics(steps: Sequence[int], per_step: Sequence[Sequence[LayerICS]], axes: Any = None, *, label: str = ""):
    """Draw ``||G - G'||`` and ``cos(G, G')`` per layer against the step (two axes)."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r.name for r in per_step[0]] if per_step else []
    for i, name in enumerate(names):
        diff = [rs[i].diff_norm for rs in per_step]
        cos = [rs[i].cosine for rs in per_step]
        axes[0].plot(steps, diff, marker=".", label=f"{label} {name}".strip())
        axes[1].plot(steps, cos, marker=".", label=f"{label} {name}".strip())
    axes[0].set_ylabel("||G - G'||")
    axes[1].set_ylabel("cos(G, G')")
    for ax in axes:
        ax.set_xlabel("step")
    return axes
