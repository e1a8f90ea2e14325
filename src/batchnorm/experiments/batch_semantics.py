"""The demo's two experiments on what "the batch" means: small batches, and a shifted test distribution.

* **Small batches**: the paper's MLP trained at batch sizes 2, 4, 8 (the same number
  of training examples at every size, so a smaller batch takes more steps) with four
  ways of getting eval-mode statistics right:

  - ``bn``: batch norm with torch's moving averages (momentum 0.1);
  - ``renorm``: Batch Renorm (Ioffe 2017), fixed bounds ``rmax``/``dmax`` from the first step;
  - ``ghost``: a larger batch (``ghost_batch`` samples) cut into ghost batches of the
    small size, so each sample is normalized with as few others as in ``bn``, but the
    gradient averages over the whole batch; the same number of examples, hence fewer steps;
  - ``precise``: the ``bn`` network with its running statistics recomputed exactly over
    the training set afterwards (:func:`batchnorm.precise_statistics`): no training of its own.

  With an MLP, each feature is normalized over the batch alone: at batch 2 every
  normalized value is about +-1, which shows the small-batch problem in seconds (the CNN
  normalizes each channel over all its positions too, so its batch statistics are less noisy).

* **Distribution shift**: the CNN (per-channel BN) trained on clean images, then scored
  on test images with Gaussian noise, lowered contrast, or moved by a pixel, three ways:
  as trained (source statistics), with its statistics recomputed on the shifted images
  (AdaBN, :func:`batchnorm.adapt`), and with γ/β also adapted by entropy minimization
  (TENT, ``adapt(..., affine=True)``). Adaptation uses unlabeled shifted test images the
  score does not count: the test set is split in two halves, each half is scored by the
  model adapted on the other, and the two scores are pooled (two-fold cross-fitting).

Both return plain data (JSON-ready); they write nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import batchnorm

from .datasets import Dataset
from .measure import PRECISE_CHUNK, with_precise_statistics
from .models import cnn, mlp
from .training import accuracy, train

__all__ = [
    "ADAPTATIONS",
    "SHIFTS",
    "SMALL_BATCH_METHODS",
    "run_shift",
    "run_small_batches",
    "shift_images",
    "shift_work",
    "small_batch_work",
    "summarize_shift",
    "summarize_small_batches",
]

SMALL_BATCH_METHODS = ("bn", "renorm", "ghost", "precise")
SHIFTS = ("noise", "contrast", "translate")
ADAPTATIONS = ("source", "statistics", "affine")  # as trained -> AdaBN -> TENT

SHIFT_DESCRIPTIONS = {
    "noise": "Gaussian noise, std 0.3 (pixels in [0, 1]), clipped",
    "contrast": "contrast lowered to 30% around mid-gray",
    "translate": "moved one pixel right and down",
}


# --- small batches ----------------------------------------------------------------


def small_batch_steps(cfg: Any, method: str, batch_size: int) -> int:
    """Training steps of one run: ``small_batch_examples`` samples at ``batch_size`` (the ghost
    arm at ``ghost_batch``); the precise arm reuses the BN run and trains nothing."""
    if method == "precise":
        return 0
    per_step = cfg.ghost_batch if method == "ghost" else batch_size
    return max(1, cfg.small_batch_examples // per_step)


def small_batch_work(cfg: Any) -> int:
    """Training steps of the whole small-batch part (for progress bars)."""
    per_seed = sum(small_batch_steps(cfg, m, b) for m in SMALL_BATCH_METHODS for b in cfg.small_batch_sizes)
    return cfg.small_batch_seeds * per_seed


def _norm_layer(method: str, batch_size: int, cfg: Any) -> Callable[[int], nn.Module]:
    if method == "renorm":
        return lambda width: batchnorm.BatchRenorm1d(width, rmax=cfg.renorm_rmax, dmax=cfg.renorm_dmax)
    if method == "ghost":
        return lambda width: batchnorm.BatchNorm1d(width, virtual_batch_size=batch_size)
    return batchnorm.BatchNorm1d


def _train_mlp(method: str, batch_size: int, seed: int, data: Dataset, tensors: tuple[torch.Tensor, ...], cfg: Any,
               progress: Callable[[int], None] | None) -> tuple[nn.Module, int | None]:  # fmt: skip
    """One small-batch run; returns the model and the step it diverged at (None if it did not)."""
    x_train, y_train, x_test, y_test = tensors
    model = mlp(int(np.prod(data.image_shape)), data.classes, bn=True, hidden=cfg.hidden, init_std=cfg.init_std,
                seed=seed, norm=_norm_layer(method, batch_size, cfg))  # fmt: skip
    steps = small_batch_steps(cfg, method, batch_size)
    history = train(model, x_train, y_train, x_test, y_test, steps=steps, lr=cfg.small_batch_lr,
                    batch_size=cfg.ghost_batch if method == "ghost" else batch_size, seed=seed, eval_every=steps,
                    progress=progress)  # fmt: skip
    if progress is not None and history.diverged_at is not None:
        progress(steps - history.diverged_at + 1)
    return model, history.diverged_at


def _precise_accuracy(model: nn.Module, x_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test accuracy after the running statistics are recomputed exactly over the training set (on a copy)."""
    return accuracy(with_precise_statistics(model, x_train), x_test, y_test)


def run_small_batches(data: Dataset, cfg: Any, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Test accuracy per method, batch size and seed (None where a run diverged)."""
    tensors = tuple(torch.from_numpy(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))
    x_train, _, x_test, y_test = tensors
    seeds = [cfg.seed + s for s in range(cfg.small_batch_seeds)]
    sizes = list(cfg.small_batch_sizes)
    acc: dict[str, dict[str, list[float | None]]] = {m: {str(b): [] for b in sizes} for m in SMALL_BATCH_METHODS}
    for seed in seeds:
        for b in sizes:
            for method in ("bn", "renorm", "ghost"):
                model, diverged_at = _train_mlp(method, b, seed, data, tensors, cfg, progress)
                acc[method][str(b)].append(None if diverged_at is not None else accuracy(model, x_test, y_test))
                if method == "bn":
                    precise = None if diverged_at is not None else _precise_accuracy(model, x_train, x_test, y_test)
                    acc["precise"][str(b)].append(precise)
    return {
        "model": "mlp",
        "hidden": list(cfg.hidden),
        "lr": cfg.small_batch_lr,
        "examples": cfg.small_batch_examples,
        "batch_sizes": sizes,
        "seeds": seeds,
        "methods": list(SMALL_BATCH_METHODS),
        "ghost_batch": cfg.ghost_batch,
        "renorm": {"rmax": cfg.renorm_rmax, "dmax": cfg.renorm_dmax},
        "precise_chunk": PRECISE_CHUNK,
        "steps": {m: {str(b): small_batch_steps(cfg, m, b) for b in sizes} for m in SMALL_BATCH_METHODS},
        "test_acc": acc,
    }


def summarize_small_batches(r: dict[str, Any]) -> dict[str, Any]:
    """Per method and batch size: mean test accuracy over seeds (None if any seed diverged) and its spread."""
    out: dict[str, Any] = {"mean_test_acc": {}, "seed_range": {}}
    for method, per_size in r["test_acc"].items():
        for b, values in per_size.items():
            done = values and all(v is not None for v in values)
            out["mean_test_acc"].setdefault(method, {})[b] = float(np.mean(values)) if done else None
            out["seed_range"].setdefault(method, {})[b] = [min(values), max(values)] if done else None
    return out


# --- distribution shift ---------------------------------------------------------


def shift_images(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (``N x C x H x W`` in [0, 1]) under one shift: ``noise`` (Gaussian, std 0.3, clipped to
    [0, 1]), ``contrast`` (to 30% around mid-gray), or ``translate`` (one pixel right and down, zero fill)."""
    if name == "noise":
        return (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0)
    if name == "contrast":
        return 0.5 + 0.3 * (x - 0.5)
    if name == "translate":
        return nn.functional.pad(x, (1, 0, 1, 0))[..., : x.shape[-2], : x.shape[-1]]
    raise ValueError(f"unknown shift {name!r}; choose one of {', '.join(SHIFTS)}")


def shift_work(cfg: Any) -> int:
    """Training steps of the shift part (for progress bars): the CNN's."""
    return cfg.cnn_steps


def _halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2 :]


def _adapted_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, halves: tuple[torch.Tensor, ...],
                      affine: bool, cfg: Any) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Two-fold: each half scored by a copy of ``model`` adapted on the other half (its images only,
    no labels); the pooled accuracy and, with ``affine``, the mean entropy before/after the TENT steps."""
    correct, entropies = 0.0, []
    for scored, adapted_on in (halves, halves[::-1]):
        adapted = copy.deepcopy(model).eval()
        images = x[adapted_on]
        batches = [images[i : i + cfg.adapt_batch] for i in range(0, len(images), cfg.adapt_batch)]
        entropies.append(batchnorm.adapt(adapted, batches, affine=affine, steps=cfg.tent_steps, lr=cfg.tent_lr))
        correct += accuracy(adapted, x[scored], y[scored]) * len(scored)
    report = {k: float(np.mean([e[k] for e in entropies])) for k in entropies[0]} if affine else {}
    return correct / len(x), report


def run_shift(data: Dataset, cfg: Any, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The BN CNN trained on clean data, scored per shift as trained, after AdaBN and after TENT."""
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in (data.x_train, data.y_train, data.x_test,
                                                                      data.y_test))  # fmt: skip
    model = cnn(data.image_shape, data.classes, bn=True, seed=cfg.seed)
    history = train(model, x_train, y_train, x_test, y_test, steps=cfg.cnn_steps, lr=cfg.cnn_lr,
                    batch_size=cfg.batch_size, seed=cfg.seed, eval_every=cfg.cnn_steps, progress=progress)  # fmt: skip
    out: dict[str, Any] = {
        "model": "cnn",
        "steps": cfg.cnn_steps,
        "lr": cfg.cnn_lr,
        "diverged_at": history.diverged_at,
        "clean_test_acc": None if history.diverged_at is not None else accuracy(model, x_test, y_test),
        "adapt": {
            "folds": 2,
            "images_per_fold": len(x_test) // 2,
            "batch": cfg.adapt_batch,
            "tent_steps": cfg.tent_steps,
            "tent_lr": cfg.tent_lr,
        },
        "shifts": {},
    }
    if history.diverged_at is not None:
        return out
    generator = torch.Generator().manual_seed(cfg.seed)
    halves = _halves(len(x_test), cfg.seed)
    for name in cfg.shifts:
        x = shift_images(x_test, name, generator)
        stats_acc, _ = _adapted_accuracy(model, x, y_test, halves, False, cfg)
        affine_acc, entropy = _adapted_accuracy(model, x, y_test, halves, True, cfg)
        out["shifts"][name] = {"description": SHIFT_DESCRIPTIONS[name], "source": accuracy(model, x, y_test),
                               "statistics": stats_acc, "affine": affine_acc, **entropy}  # fmt: skip
    return out


def summarize_shift(r: dict[str, Any]) -> dict[str, Any]:
    """Per shift: accuracy as trained, after AdaBN, after TENT; and the clean accuracy."""
    return {
        "clean_test_acc": r["clean_test_acc"],
        "diverged_at": r["diverged_at"],
        **{name: {a: s[a] for a in ADAPTATIONS} for name, s in r["shifts"].items()},
    }
