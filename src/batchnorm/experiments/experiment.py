"""The demo's experiment: what batch normalization changes, measured on one dataset.

Three parts, each with and without BN from the same initialization:

1. the paper's MLP at one learning rate: accuracy/loss curves, the input
   percentiles of the last hidden layer's sigmoids and every layer's input
   drift, gradient ICS per layer at evenly spaced steps, and inference (one
   image at a time with batch vs population statistics, the folded layer);
2. the small CNN (per-channel BN, ReLU): the same, less the sweep;
3. a learning-rate sweep of the MLP over several seeds (trained as ensembles);

and two about what "the batch" means, with BN only (``batch_semantics``):

4. small batches: the MLP at batch 2, 4, 8 with BN, Batch Renorm, ghost batches
   and precise statistics;
5. distribution shift: the CNN on shifted test images, as trained, with adapted
   statistics (AdaBN) and with adapted γ/β (TENT);

and two about why BN helps, after Santurkar et al. 2018 (``smoothness``):

6. smoothness: the loss and its gradient probed along the gradient during training;
7. noisy BN: non-stationary noise after every BN layer, against plain and BN;

and one about the statistics eval mode uses, after Wu & Johnson 2021 (``population``):

8. population statistics: moving averages and precise statistics against the truth,
   and batch against population statistics per normalization batch size.

``run_experiment`` returns plain data (JSON-ready) plus the recorders the
figures need; it writes nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from batchnorm.ics import InputRecorder, gradient_ics

from . import batch_semantics, measure, population, smoothness
from .datasets import Dataset
from .models import MLPEnsemble, activation_modules, cnn, mlp, weight_layers
from .training import History, train, train_ensemble

__all__ = ["ARMS", "PARTS", "Config", "run_experiment"]

ARMS = ("plain", "bn")  # without / with batch normalization
PARTS = (
    "cnn",
    "sweep",
    "small-batch",
    "shift",
    "smoothness",
    "noisy-bn",
    "population",
)  # the parts --skip can leave out (the MLP always runs)


@dataclass
class Config:
    """Every knob of the run; the defaults are the full demo, :meth:`quick` the short one."""

    seed: int = 0
    batch_size: int = 60  # the paper's
    hidden: tuple[int, ...] = (100, 100, 100)  # the paper's: three layers of 100 sigmoids
    init_std: float = 0.05  # "small Gaussian initialization"; the paper gives no value
    mlp_steps: int = 2000
    mlp_lr: float = 3.0
    cnn_steps: int = 400
    cnn_lr: float = 0.2
    eval_every: int = 25
    ics_points: int = 16  # steps at which the gradient ICS is measured
    sweep_lrs: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    sweep_seeds: int = 2
    sweep_steps: int = 1500
    sweep_eval_every: int = 50
    target: float = 0.9  # test accuracy whose first step is reported
    probe_size: int = 1000  # test images behind each percentile record
    single_limit: int = 2000  # test images predicted one at a time
    small_batch_sizes: tuple[int, ...] = (2, 4, 8)
    small_batch_examples: int = 8000  # training examples per run at every batch size (about 6 epochs of digits)
    small_batch_lr: float = 0.1  # the MLP's lr 3 at batch 60, scaled linearly to batch 2; one rate for every size
    small_batch_seeds: int = 3
    ghost_batch: int = 32  # the ghost arm's batch, cut into ghosts of the small batch size
    renorm_rmax: float = 3.0  # Batch Renorm's bounds (the library's defaults), fixed from the first step
    renorm_dmax: float = 5.0
    shifts: tuple[str, ...] = batch_semantics.SHIFTS
    adapt_batch: int = 64  # unlabeled shifted images per adaptation batch
    tent_steps: int = 10  # passes over the adaptation half with affine=True
    tent_lr: float = 1e-3  # Adam, TENT's rate
    smoothness_points: int = 8  # training steps (evenly spaced) at which the loss landscape is probed
    smoothness_step_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # probe step sizes, times mlp_lr
    noise_scale_spread: float = 0.5  # noisy BN: each unit scaled by U(1 - spread, 1 + spread) per step
    noise_shift_std: float = 1.0  # noisy BN: and shifted by N(0, std^2) per step
    smoothness_seeds: int = 3  # smoothness: each arm trained and probed from this many seeds (the figure's bands)
    population_norm_batches: tuple[int, ...] = (2, 4, 10, 20, 60)  # population: normalization (ghost) batch sizes
    population_momenta: tuple[float, ...] = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)  # moving averages kept alongside
    population_samples: tuple[int, ...] = (30, 60, 120, 240, 480, 960)  # precise statistics from this many samples
    population_draws: int = 5  # random training subsets per sample count
    population_seeds: int = 2  # each normalization batch size trained from this many seeds
    skip: tuple[str, ...] = field(default_factory=tuple)  # parts to leave out: see PARTS
    smoke_run: bool = False  # --quick: too short for conclusions

    @classmethod
    def quick(cls, **overrides: Any) -> Config:
        base = dict(mlp_steps=150, cnn_steps=80, eval_every=25, ics_points=4, sweep_lrs=(0.1, 1.0, 3.0, 10.0, 100.0),
                    sweep_seeds=2, sweep_steps=150, sweep_eval_every=25, single_limit=100, small_batch_examples=800,
                    small_batch_seeds=1, tent_steps=2, smoothness_points=4, smoothness_seeds=1,
                    population_seeds=1, population_draws=2, smoke_run=True)  # fmt: skip
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        for name in (
            "mlp_steps",
            "cnn_steps",
            "sweep_steps",
            "batch_size",
            "eval_every",
            "sweep_eval_every",
            "sweep_seeds",
            "ics_points",
            "small_batch_examples",
            "small_batch_seeds",
            "ghost_batch",
            "adapt_batch",
            "tent_steps",
            "smoothness_points",
            "smoothness_seeds",
            "population_draws",
            "population_seeds",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.sweep_lrs:
            raise ValueError("the learning-rate list is empty")
        for lr in (self.mlp_lr, self.cnn_lr, self.small_batch_lr, self.tent_lr, *self.sweep_lrs):
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(f"learning rates must be positive numbers, got {lr}")
        if not 0 < self.target <= 1:
            raise ValueError(f"target accuracy must be in (0, 1], got {self.target}")
        if not self.smoothness_step_factors or not all(
            math.isfinite(f) and f > 0 for f in self.smoothness_step_factors
        ):
            raise ValueError(f"smoothness step factors must be positive numbers, got {self.smoothness_step_factors}")
        if not (self.noise_scale_spread >= 0 and self.noise_shift_std >= 0):
            raise ValueError("noise scale spread and shift std must be non-negative")
        if self.init_std <= 0:
            raise ValueError(f"init-std must be positive, got {self.init_std}")
        unknown = set(self.skip) - set(PARTS)
        if unknown:
            raise ValueError(f"cannot skip {sorted(unknown)}: only {', '.join(PARTS)}")
        self._validate_batch_semantics()
        self._validate_population()

    def _validate_population(self) -> None:
        if not self.population_norm_batches or any(v < 2 for v in self.population_norm_batches):
            raise ValueError(f"normalization batch sizes must be at least 2, got {self.population_norm_batches}")
        if not self.population_momenta or not all(0 < m <= 1 for m in self.population_momenta):
            raise ValueError(f"moving-average momenta must lie in (0, 1], got {self.population_momenta}")
        if not self.population_samples or any(n < 2 for n in self.population_samples):
            raise ValueError(f"precise-statistics sample counts must be at least 2, got {self.population_samples}")

    def _validate_batch_semantics(self) -> None:
        if not self.small_batch_sizes or any(b < 2 for b in self.small_batch_sizes):
            raise ValueError(
                f"small batch sizes must be at least 2 (batch norm of one sample), got {self.small_batch_sizes}"
            )
        if self.ghost_batch < max(self.small_batch_sizes):
            raise ValueError(f"ghost-batch ({self.ghost_batch}) must be at least the largest small batch size")
        if not (self.renorm_rmax >= 1 and self.renorm_dmax >= 0):
            raise ValueError(f"Batch Renorm needs rmax >= 1 and dmax >= 0, got {self.renorm_rmax}, {self.renorm_dmax}")
        unknown = set(self.shifts) - set(batch_semantics.SHIFTS)
        if unknown or not self.shifts:
            raise ValueError(f"shifts must be some of {', '.join(batch_semantics.SHIFTS)}, got {self.shifts}")

    def work(self) -> dict[str, int]:
        """Training steps per part (for progress bars)."""
        parts = {"mlp": 2 * self.mlp_steps}
        if "cnn" not in self.skip:
            parts["cnn"] = 2 * self.cnn_steps
        if "sweep" not in self.skip:
            parts["sweep"] = 2 * self.sweep_steps
        if "small-batch" not in self.skip:
            parts["small-batch"] = batch_semantics.small_batch_work(self)
        if "shift" not in self.skip:
            parts["shift"] = batch_semantics.shift_work(self)
        if "smoothness" not in self.skip:
            parts["smoothness"] = smoothness.smoothness_work(self)
        if "noisy-bn" not in self.skip:
            parts["noisy-bn"] = smoothness.noisy_bn_work(self)
        if "population" not in self.skip:
            parts["population"] = population.population_work(self)
        return parts


def _tensors(data: Dataset) -> tuple[torch.Tensor, ...]:
    return (
        torch.from_numpy(data.x_train),
        torch.from_numpy(data.y_train),
        torch.from_numpy(data.x_test),
        torch.from_numpy(data.y_test),
    )


def _history_dict(h: History, target: float) -> dict[str, Any]:
    return {
        "steps": h.steps,
        "test_acc": h.test_acc,
        "train_loss": [None if math.isnan(v) else v for v in h.train_loss],
        "diverged_at": h.diverged_at,
        "final_test_acc": h.test_acc[-1] if h.diverged_at is None else None,
        "steps_to_target": h.steps_to(target),
    }


def _run_arms(kind: str, data: Dataset, cfg: Config, progress: Callable[[int], None] | None) -> tuple[dict, dict]:
    """Train both arms of ``kind`` ("mlp" or "cnn"); returns (results, recorders for the figures)."""
    x_train, y_train, x_test, y_test = _tensors(data)
    steps, lr = (cfg.mlp_steps, cfg.mlp_lr) if kind == "mlp" else (cfg.cnn_steps, cfg.cnn_lr)
    probe = x_test[: cfg.probe_size]
    ics_steps = sorted({max(1, round(steps * (k + 1) / cfg.ics_points)) for k in range(cfg.ics_points)} | {1})
    out: dict[str, Any] = {"lr": lr, "steps": steps, "ics_steps": ics_steps, "arms": {}}
    recorders: dict[str, InputRecorder] = {}
    for arm in ARMS:
        bn = arm == "bn"
        if kind == "mlp":
            model = mlp(int(np.prod(data.image_shape)), data.classes, bn=bn, hidden=cfg.hidden, init_std=cfg.init_std,
                        seed=cfg.seed)  # fmt: skip
        else:
            model = cnn(data.image_shape, data.classes, bn=bn, seed=cfg.seed)
        acts = activation_modules(model)
        last = list(acts)[-1]
        recorder = InputRecorder(acts, unit=0)
        ics: list[list[Any]] = []

        def record(step: int, model=model, recorder=recorder) -> None:
            was = model.training
            model.eval()
            recorder.record(step, model, probe)
            model.train(was)

        def measure_ics(step: int, xb: torch.Tensor, yb: torch.Tensor, model=model, ics=ics) -> None:
            if step in ics_steps:
                ics.append(gradient_ics(model, F.cross_entropy, xb, yb, lr=lr, layers=weight_layers(model)))

        start = time.perf_counter()
        history = train(model, x_train, y_train, x_test, y_test, steps=steps, lr=lr, batch_size=cfg.batch_size,
                        seed=cfg.seed, eval_every=cfg.eval_every, before_step=measure_ics, after_eval=record,
                        progress=progress)  # fmt: skip
        recorder.detach()
        if progress is not None and history.diverged_at is not None:
            progress(steps - history.diverged_at + 1)
        arm_out = _history_dict(history, cfg.target)
        arm_out["seconds"] = time.perf_counter() - start
        arm_out["inputs"] = recorder.to_dict()
        arm_out["inputs"]["last_hidden"] = last
        keys = ("grad_norm", "shifted_grad_norm", "diff_norm", "cosine")
        names = [res.name for res in ics[0]] if ics else []
        arm_out["ics"] = {
            "steps": ics_steps[: len(ics)],
            "layers": {
                n: {key: [getattr(step_res[i], key) for step_res in ics] for key in keys} for i, n in enumerate(names)
            },
        }
        if history.diverged_at is None:
            arm_out["inference"] = _inference(model, x_test, y_test, cfg)
        out["arms"][arm] = arm_out
        recorders[arm] = recorder
    return out, recorders


def _inference(model: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, cfg: Config) -> dict[str, Any]:
    y = y_test
    pop = measure.predictions(model, x_test)
    result: dict[str, Any] = {"test_acc_population": float((pop == y).double().mean())}
    has_bn = any(isinstance(m, measure._BN) for m in model.modules())
    if not has_bn:
        return result
    n = min(cfg.single_limit, len(x_test))
    xs, ys = x_test[:n], y[:n]
    result["single_image_count"] = n
    result["single_image_acc_population"] = float((measure.predictions(model, xs, batch_size=1) == ys).double().mean())
    single_batch = measure.batch_stats_predictions(model, xs, batch_size=1)
    result["single_image_acc_batch_stats"] = float((single_batch == ys).double().mean())
    result["single_image_batch_stats_distinct_predictions"] = int(single_batch.unique().numel())
    result[f"batch{cfg.batch_size}_acc_batch_stats"] = float(
        (measure.batch_stats_predictions(model, x_test, batch_size=cfg.batch_size) == y).double().mean()
    )
    folded = measure.fold_batchnorm(model)
    with torch.no_grad():
        model.eval()
        chunks = [x_test[i : i + 1000] for i in range(0, len(x_test), 1000)]
        logits = torch.cat([model(c) for c in chunks])
        logits_folded = torch.cat([folded(c) for c in chunks])
        model.train()
    result["folded_same_predictions"] = bool((logits.argmax(-1) == logits_folded.argmax(-1)).all())
    result["folded_max_abs_logit_diff"] = float((logits - logits_folded).abs().max())
    return result


def _sweep(data: Dataset, cfg: Config, progress: Callable[[int], None] | None) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = _tensors(data)
    lrs = [lr for lr in cfg.sweep_lrs for _ in range(cfg.sweep_seeds)]
    seeds = [cfg.seed + s for _ in cfg.sweep_lrs for s in range(cfg.sweep_seeds)]
    out: dict[str, Any] = {
        "lrs": list(cfg.sweep_lrs),
        "seeds": sorted(set(seeds)),
        "steps": cfg.sweep_steps,
        "arms": {},
    }
    for arm in ARMS:
        ensemble = MLPEnsemble(int(np.prod(data.image_shape)), data.classes, bn=arm == "bn", seeds=seeds,
                               hidden=cfg.hidden, init_std=cfg.init_std)  # fmt: skip
        start = time.perf_counter()
        res = train_ensemble(ensemble, lrs, seeds, x_train, y_train, x_test, y_test, steps=cfg.sweep_steps,
                             batch_size=cfg.batch_size, eval_every=cfg.sweep_eval_every, progress=progress)  # fmt: skip
        s = cfg.sweep_seeds
        per_lr = []
        for i, lr in enumerate(cfg.sweep_lrs):
            runs = []
            for j in range(i * s, (i + 1) * s):
                acc = res.test_acc[j]
                reached = next((st for st, a in zip(res.steps, acc, strict=True) if a >= cfg.target), None)
                runs.append({
                    "seed": seeds[j],
                    "diverged_at": res.diverged_at[j],
                    "final_test_acc": None if res.diverged_at[j] is not None else acc[-1],
                    "final_train_loss": None if math.isnan(res.final_loss[j]) else res.final_loss[j],
                    "steps_to_target": None if res.diverged_at[j] is not None else reached,
                    "test_acc": [None if math.isnan(a) else a for a in acc],
                })  # fmt: skip
            per_lr.append({"lr": lr, "runs": runs, "status": _status(runs)})
        trains = [p["lr"] for p in per_lr if p["status"] == "trains"]
        out["arms"][arm] = {
            "per_lr": per_lr,
            "eval_steps": res.steps,
            "seconds": time.perf_counter() - start,
            "trains_lr_range": [min(trains), max(trains)] if trains else None,
            "trains_lrs": trains,
        }
    return out


def _status(runs: list[dict[str, Any]]) -> str:
    """'trains' when every seed reaches the target, 'diverged' when any run diverged, else 'fails'."""
    if any(r["diverged_at"] is not None for r in runs):
        return "diverged"
    return "trains" if all(r["steps_to_target"] is not None for r in runs) else "fails"


def run_experiment(data: Dataset, cfg: Config, progress: Callable[[str], Callable[[int], None] | None] | None = None):
    """Run every part; ``progress(part)`` may return a callback that takes the number of steps done."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    results: dict[str, Any] = {"config": asdict(cfg), "dataset": _dataset_info(data)}
    recorders: dict[str, dict[str, InputRecorder]] = {}
    timing: dict[str, float] = {}
    for part in ("mlp", "cnn"):
        if part in cfg.skip:
            continue
        start = time.perf_counter()
        results[part], recorders[part] = _run_arms(part, data, cfg, progress(part) if progress else None)
        timing[part] = time.perf_counter() - start
    if "sweep" not in cfg.skip:
        start = time.perf_counter()
        results["sweep"] = _sweep(data, cfg, progress("sweep") if progress else None)
        timing["sweep"] = time.perf_counter() - start
    for part, key, run in (("small-batch", "small_batch", batch_semantics.run_small_batches),
                           ("shift", "shift", batch_semantics.run_shift),
                           ("smoothness", "smoothness", smoothness.run_smoothness),
                           ("noisy-bn", "noisy_bn", smoothness.run_noisy_bn),
                           ("population", "population", population.run_population)):  # fmt: skip
        if part in cfg.skip:
            continue
        start = time.perf_counter()
        results[key] = run(data, cfg, progress(part) if progress else None)
        timing[key] = time.perf_counter() - start
    results["timing_seconds"] = timing
    results["summary"] = summarize(results)
    return results, recorders


def _dataset_info(data: Dataset) -> dict[str, Any]:
    return {
        "name": data.name,
        "train": len(data.x_train),
        "test": len(data.x_test),
        "image_shape": list(data.image_shape),
        "classes": data.classes,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The key numbers, per part and arm."""
    cfg = results["config"]
    summary: dict[str, Any] = {"target": cfg["target"]}
    for part in ("mlp", "cnn"):
        if part not in results:
            continue
        for arm, r in results[part]["arms"].items():
            s = summary.setdefault(part, {}).setdefault(arm, {})
            s["steps_to_target"] = r["steps_to_target"]
            s["final_test_acc"] = r["final_test_acc"]
            s["diverged_at"] = r["diverged_at"]
            inf = r.get("inference", {})
            for key in ("single_image_acc_batch_stats", "single_image_acc_population", "folded_same_predictions",
                        "single_image_count"):  # fmt: skip
                if key in inf:
                    s[key] = inf[key]
            layers = r["ics"]["layers"]
            s["ics_mean_diff_norm"] = {n: float(np.nanmean(v["diff_norm"])) for n, v in layers.items()}
            s["ics_mean_relative_diff"] = {
                n: float(np.nanmean(np.asarray(v["diff_norm"]) / np.maximum(np.asarray(v["grad_norm"]), 1e-30)))
                for n, v in layers.items()
            }
            s["ics_mean_cosine"] = {n: float(np.nanmean(v["cosine"])) for n, v in layers.items()}
            last = r["inputs"]["last_hidden"]
            pct = np.asarray(r["inputs"]["layers"][last]["unit_percentiles"])[1:]  # R-1,3 (after step 0)
            half = pct[len(pct) // 2 :]
            s["last_hidden_median_range"] = _range(pct[:, 1])
            s["last_hidden_median_range_second_half"] = _range(half[:, 1])
            drift = r["inputs"]["layers"][last]["drift_mean_shift"]
            # None where there is nothing to sum (a diverged run, one record): never a misleading 0
            s["last_hidden_mean_drift_total"] = float(np.sum(drift)) if len(drift) > 1 and np.all(
                np.isfinite(drift)) else None  # fmt: skip
    if "sweep" in results:
        for arm, r in results["sweep"]["arms"].items():
            s = summary.setdefault("sweep", {}).setdefault(arm, {})
            s["trains_lr_range"] = r["trains_lr_range"]
            s["status"] = {str(p["lr"]): p["status"] for p in r["per_lr"]}
            s["median_steps_to_target"] = {
                str(p["lr"]): _median([run["steps_to_target"] for run in p["runs"]]) for p in r["per_lr"]
            }
            reached = [(v, float(lr)) for lr, v in s["median_steps_to_target"].items() if v is not None]
            s["fastest"] = {"median_steps_to_target": min(reached)[0], "lr": min(reached)[1]} if reached else None
    if "small_batch" in results:
        summary["small_batch"] = batch_semantics.summarize_small_batches(results["small_batch"])
    if "shift" in results:
        summary["shift"] = batch_semantics.summarize_shift(results["shift"])
    if "smoothness" in results:
        summary["smoothness"] = smoothness.summarize_smoothness(results["smoothness"])
    if "noisy_bn" in results:
        summary["noisy_bn"] = smoothness.summarize_noisy_bn(results["noisy_bn"])
    if "population" in results:
        summary["population"] = population.summarize_population(results["population"])
    return summary


def _range(values: np.ndarray) -> list[float] | None:
    return [float(values.min()), float(values.max())] if len(values) else None


def _median(values: list[int | None]) -> float | None:
    """Median over runs, counting a run that never reached the target as infinitely slow; None if most never did."""
    vals = sorted(math.inf if v is None else v for v in values)
    m = float(np.median(vals))
    return None if math.isinf(m) else m
