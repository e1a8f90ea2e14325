"""The demo's two experiments on *why* batch norm helps, after Santurkar et al. (2018).

* **Smoothness** (their Figure 4): the paper's MLP trained with and without BN at the
  demo's learning rate, from each of ``smoothness_seeds`` seeds; at evenly spaced steps,
  from the parameters of that moment, the loss on one fixed training batch (drawn from
  that seed) is probed along the gradient at several step sizes (log-spaced around the
  training rate) with :func:`batchnorm.ics.loss_landscape`. Per probe: the range of the
  loss, the gradient predictiveness (the largest change of the gradient along the step)
  and the effective beta-smoothness (the largest gradient change per unit distance).
  Smaller is smoother. The summary compares the arms probe by probe, seed by seed.

* **Noisy BN** (their Figure 2): the BN network with :class:`NoisyShift` after every BN
  layer, which in training moves each unit's distribution by a random scale and shift
  drawn anew every step (non-stationary noise; identity in eval). Trained like the
  plain and BN networks, with the per-unit batch mean of the last hidden layer's sigmoid
  input recorded at every training step, to measure how unstable the distributions are.

Both return plain data (JSON-ready); they write nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import batchnorm
from batchnorm.ics import loss_landscape

from .datasets import Dataset
from .models import activation_modules, mlp
from .training import train

__all__ = [
    "NOISY_ARMS",
    "SMOOTHNESS_ARMS",
    "SMOOTHNESS_MEASURES",
    "NoisyShift",
    "noisy_bn_work",
    "probe_steps",
    "run_noisy_bn",
    "run_smoothness",
    "smoothness_pairs",
    "smoothness_seeds",
    "smoothness_work",
    "step_sizes",
    "summarize_noisy_bn",
    "summarize_smoothness",
]

SMOOTHNESS_ARMS = ("plain", "bn")
NOISY_ARMS = ("plain", "bn", "noisy")
SMOOTHNESS_MEASURES = ("loss_range", "gradient_predictiveness", "beta_smoothness")
TRACE_POINTS = 400  # at most this many per-step values of the traced unit's mean are kept per arm


class NoisyShift(nn.Module):
    """Non-stationary noise on each unit's distribution (Santurkar et al. 2018, Figure 2).

    In training, every forward multiplies unit ``j`` by ``scale_j ~ U(1 - spread, 1 + spread)``
    and adds ``shift_j ~ N(0, shift_std^2)``, both drawn anew per call (one value per unit for
    the whole batch, so the unit's distribution itself moves from step to step). In eval:
    the identity. Draws come from ``generator`` (seeded) so a run is reproducible.
    """

    def __init__(self, width: int, *, spread: float, shift_std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.width, self.spread, self.shift_std, self.generator = width, spread, shift_std, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        scale = 1 + self.spread * (2 * torch.rand(self.width, generator=self.generator) - 1)
        shift = self.shift_std * torch.randn(self.width, generator=self.generator)
        return x * scale.to(x.dtype) + shift.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.width}, spread={self.spread}, shift_std={self.shift_std}"


def _noisy_norm(cfg: Any, generator: torch.Generator) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        noise = NoisyShift(width, spread=cfg.noise_scale_spread, shift_std=cfg.noise_shift_std, generator=generator)
        return nn.Sequential(batchnorm.BatchNorm1d(width), noise)

    return build


def _build(arm: str, data: Dataset, cfg: Any, seed: int | None = None) -> nn.Module:
    """The arm's MLP, initialized from ``seed`` (default ``cfg.seed``)."""
    seed = cfg.seed if seed is None else seed
    kwargs = dict(hidden=cfg.hidden, init_std=cfg.init_std, seed=seed)
    features = int(np.prod(data.image_shape))
    if arm == "noisy":
        generator = torch.Generator().manual_seed(seed + 1)
        return mlp(features, data.classes, bn=True, norm=_noisy_norm(cfg, generator), **kwargs)
    return mlp(features, data.classes, bn=arm == "bn", **kwargs)


def _tensors(data: Dataset) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))


def _history(h: Any, target: float) -> dict[str, Any]:
    return {
        "steps": h.steps,
        "test_acc": h.test_acc,
        "diverged_at": h.diverged_at,
        "final_test_acc": h.test_acc[-1] if h.diverged_at is None else None,
        "steps_to_target": h.steps_to(target),
    }


# --- smoothness -------------------------------------------------------------------


def probe_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced training steps from the first to the last (a probe runs before that step's update)."""
    return sorted({1 + round((steps - 1) * k / max(1, points - 1)) for k in range(points)})


def step_sizes(lr: float, factors: tuple[float, ...]) -> list[float]:
    return [lr * f for f in factors]


def smoothness_seeds(cfg: Any) -> list[int]:
    """The seeds each arm is trained and probed from: ``cfg.seed + k`` for ``k < cfg.smoothness_seeds``."""
    return [cfg.seed + k for k in range(cfg.smoothness_seeds)]


def smoothness_work(cfg: Any) -> int:
    return len(SMOOTHNESS_ARMS) * cfg.smoothness_seeds * cfg.mlp_steps


def _fixed_batch(x_train: torch.Tensor, y_train: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, ...]:
    idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed + 2))[:size]
    return x_train[idx], y_train[idx]


def _probed_run(
    arm: str,
    data: Dataset,
    cfg: Any,
    seed: int,
    at: list[int],
    etas: list[float],
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """One arm trained from ``seed`` (initialization, batch order and the fixed probe batch), probed at ``at``."""
    x_train, y_train, x_test, y_test = _tensors(data)
    xb_fixed, yb_fixed = _fixed_batch(x_train, y_train, cfg.batch_size, seed)
    model = _build(arm, data, cfg, seed)
    probes: list[dict[str, Any]] = []

    def probe(step: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        if step in at:
            probes.append(loss_landscape(model, F.cross_entropy, xb_fixed, yb_fixed, etas).as_dict())

    history = train(model, x_train, y_train, x_test, y_test, steps=cfg.mlp_steps, lr=cfg.mlp_lr,
                    batch_size=cfg.batch_size, seed=seed, eval_every=cfg.eval_every, before_step=probe,
                    progress=progress)  # fmt: skip
    if progress is not None and history.diverged_at is not None:
        progress(cfg.mlp_steps - history.diverged_at + 1)
    run = _history(history, cfg.target)
    run["probe_steps"] = at[: len(probes)]
    run["probes"] = probes
    for name in SMOOTHNESS_MEASURES:
        run[name] = [p[name] for p in probes]
    return run


def run_smoothness(data: Dataset, cfg: Any, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per arm, one run per seed (``out["arms"][arm]["runs"]``, in the order of ``out["seeds"]``): the three
    smoothness measures (and every probed loss and gradient change) at each probe step."""
    at = probe_steps(cfg.mlp_steps, cfg.smoothness_points)
    etas = step_sizes(cfg.mlp_lr, cfg.smoothness_step_factors)
    seeds = smoothness_seeds(cfg)
    out: dict[str, Any] = {"model": "mlp", "lr": cfg.mlp_lr, "steps": cfg.mlp_steps, "probe_steps": at,
                           "step_sizes": etas, "batch": cfg.batch_size, "seeds": seeds, "arms": {}}  # fmt: skip
    for arm in SMOOTHNESS_ARMS:
        out["arms"][arm] = {"runs": [_probed_run(arm, data, cfg, seed, at, etas, progress) for seed in seeds]}
    return out


def smoothness_pairs(r: dict[str, Any]) -> list[tuple[int, int, int, int]]:
    """``(seed index, probe step, plain's probe index, BN's probe index)`` for every seed and probe step at which
    both arms have a probe (an arm that diverged has none after it)."""
    pairs = []
    for k, (plain, bn) in enumerate(zip(r["arms"]["plain"]["runs"], r["arms"]["bn"]["runs"], strict=True)):
        bn_at = {step: i for i, step in enumerate(bn["probe_steps"])}
        pairs += [(k, step, i, bn_at[step]) for i, step in enumerate(plain["probe_steps"]) if step in bn_at]
    return pairs


def summarize_smoothness(r: dict[str, Any]) -> dict[str, Any]:
    """Per measure, over every (seed, probe step) at which both arms have a probe: each arm's median, at how many
    of these BN's value is the smaller, and the median of plain's value over BN's."""
    pairs = smoothness_pairs(r)
    n = len(pairs)
    plain, bn = r["arms"]["plain"]["runs"], r["arms"]["bn"]["runs"]
    out: dict[str, Any] = {"seeds": len(plain), "probes_compared": n}
    for name in SMOOTHNESS_MEASURES:
        a = np.asarray([plain[k][name][i] for k, _, i, _ in pairs], float)
        b = np.asarray([bn[k][name][j] for k, _, _, j in pairs], float)
        out[name] = {
            "median_plain": float(np.median(a)) if n else None,
            "median_bn": float(np.median(b)) if n else None,
            "bn_smaller_at": int(np.sum(b < a)),
            "median_ratio_plain_over_bn": float(np.median(a / np.maximum(b, 1e-300))) if n else None,
        }
    return out


# --- noisy BN ---------------------------------------------------------------------


def noisy_bn_work(cfg: Any) -> int:
    return len(NOISY_ARMS) * cfg.mlp_steps


class _UnitMeans:
    """The per-unit batch mean of one module's input at every training-mode forward (eval forwards ignored)."""

    def __init__(self, module: nn.Module) -> None:
        self.means: list[np.ndarray] = []
        self.stds: list[np.ndarray] = []
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            x = args[0].detach().double()
            self.means.append(x.mean(0).numpy())
            self.stds.append(x.std(0, correction=0).numpy())

    def detach(self) -> None:
        self._handle.remove()


def instability(means: np.ndarray, stds: np.ndarray) -> dict[str, float | None]:
    """How much a layer's input distribution moves between consecutive training steps: the RMS over units
    and steps of the change of each unit's batch mean (and std); and the mean over units of the std over
    steps of each unit's batch mean (how widely it wanders over the whole run)."""
    if len(means) < 2:
        return {"mean_step_change": None, "std_step_change": None, "mean_spread": None}
    return {
        "mean_step_change": float(np.sqrt(np.mean(np.diff(means, axis=0) ** 2))),
        "std_step_change": float(np.sqrt(np.mean(np.diff(stds, axis=0) ** 2))),
        "mean_spread": float(np.mean(np.std(means, axis=0))),
    }


def run_noisy_bn(data: Dataset, cfg: Any, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per arm (plain, BN, noisy BN): test accuracy over steps and the instability of the last hidden layer's
    sigmoid input in training mode (for the noisy arm: after the noise, which is what the sigmoid sees)."""
    x_train, y_train, x_test, y_test = _tensors(data)
    out: dict[str, Any] = {"model": "mlp", "lr": cfg.mlp_lr, "steps": cfg.mlp_steps, "unit": 0, "target": cfg.target,
                           "noise": {"scale_spread": cfg.noise_scale_spread, "shift_std": cfg.noise_shift_std},
                           "arms": {}}  # fmt: skip
    for arm in NOISY_ARMS:
        model = _build(arm, data, cfg)
        layer, sigmoid = list(activation_modules(model).items())[-1]
        tracker = _UnitMeans(sigmoid)
        history = train(model, x_train, y_train, x_test, y_test, steps=cfg.mlp_steps, lr=cfg.mlp_lr,
                        batch_size=cfg.batch_size, seed=cfg.seed, eval_every=cfg.eval_every,
                        progress=progress)  # fmt: skip
        tracker.detach()
        if progress is not None and history.diverged_at is not None:
            progress(cfg.mlp_steps - history.diverged_at + 1)
        means, stds = np.asarray(tracker.means), np.asarray(tracker.stds)
        every = max(1, math.ceil(len(means) / TRACE_POINTS))
        arm_out = _history(history, cfg.target)
        arm_out["instability"] = instability(means, stds)
        arm_out["unit_mean_trace"] = {"steps": list(range(1, len(means) + 1, every)),
                                      "values": means[::every, out["unit"]].tolist() if len(means) else []}  # fmt: skip
        out["layer"] = layer
        out["arms"][arm] = arm_out
    return out


def summarize_noisy_bn(r: dict[str, Any]) -> dict[str, Any]:
    """Per arm: steps to the target, final test accuracy and the instability measures."""
    return {
        arm: {
            "steps_to_target": a["steps_to_target"],
            "final_test_acc": a["final_test_acc"],
            "diverged_at": a["diverged_at"],
            **a["instability"],
        }
        for arm, a in r["arms"].items()
    }
