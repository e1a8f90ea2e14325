"""The gradient view of internal covariate shift (Santurkar et al. 2018, Definition 2.1):
:func:`gradient_ics` measures how much a layer's weight gradient changes when the layers
before it take their step; :func:`plot_ics` draws it over training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ._snapshot import Snapshot, loss_and_gradients

Tensor = torch.Tensor

__all__ = ["LayerICS", "gradient_ics", "plot_ics"]


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

    snapshot = Snapshot(model, params)

    def gradients() -> tuple[Tensor, ...]:
        return loss_and_gradients(model, loss_fn, inputs, targets, params, snapshot)[1]

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


def _compare(name: str, g: Tensor, g_shift: Tensor) -> LayerICS:
    g, g_shift = g.double().flatten(), g_shift.double().flatten()
    norm, norm_shift = g.norm().item(), g_shift.norm().item()
    cosine = (g @ g_shift).item() / (norm * norm_shift) if norm > 0 and norm_shift > 0 else math.nan
    return LayerICS(name, norm, norm_shift, (g - g_shift).norm().item(), cosine)


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
