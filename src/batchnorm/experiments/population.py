"""The demo's experiment on the statistics eval mode uses, after Wu & Johnson (2021),
"Rethinking 'Batch' in BatchNorm".

* **Estimation**: the BN MLP trained as in the demo's first part (batch ``B``, the same
  rate and steps), from each of ``population_seeds`` seeds. While it trains, moving
  averages at several momenta are kept beside the layers' own, from each training batch's
  mean and unbiased variance (the momentum changes no weight, only the running
  statistics, so one run serves them all). Afterwards the truth: each layer's moments over
  the whole training set in one batch (``batchnorm.population_moments``). Every estimate
  is loaded into a copy of the network and scored by its statistics error
  (:func:`batchnorm.ics.statistics_error`: the normalized output's error, averaged over
  the layers) and its test accuracy:

  - precise statistics (``batchnorm.precise_statistics``) from ``N`` random training
    samples in batches of ``B``, several draws per ``N``, and from the whole set;
  - each moving average, placed at its effective sample count ``B (2 - m) / m`` (the
    uniform average with the same variance, for a stationary input).

* **Normalization batch size**: the MLP trained with ghost batches (each batch of ``B``
  normalized in groups of ``v`` samples; ``v = B`` is plain BN, the run above), for each
  ``v`` in ``population_norm_batches``. Per ``v``: accuracy on the test set (and on the
  training set) normalizing by the statistics of batches of ``v`` as in training, against
  eval mode with the population's statistics (:func:`batchnorm.ics.mode_gap`, after
  precise statistics over the whole training set); the difference is the train/eval gap.

Returns plain data (JSON-ready); writes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import batchnorm
from batchnorm.ics import mode_gap, statistics_error
from batchnorm.population import batch_norm_layers

from .datasets import Dataset
from .measure import PRECISE_CHUNK, with_precise_statistics
from .models import mlp
from .training import accuracy, train

__all__ = [
    "MovingAverages",
    "effective_samples",
    "population_work",
    "run_population",
    "summarize_population",
]


class MovingAverages:
    """Running means and variances at several momenta for every batch-norm layer of a model, updated from
    each training-mode forward as torch updates its own (``r <- (1 - m) r + m * batch mean``, the variance
    unbiased; starting from 0 and 1), in float64. Momentum changes no weight, so these are exactly the running
    statistics the same training would have left with each momentum."""

    def __init__(self, model: nn.Module, momenta: tuple[float, ...]) -> None:
        self.momenta = torch.tensor(momenta, dtype=torch.float64)[:, None]
        self.layers = batch_norm_layers(model)
        self.mean = {name: torch.zeros(len(momenta), layer.num_features, dtype=torch.float64)
                     for name, layer in self.layers}  # fmt: skip
        self.var = {name: torch.ones_like(m) for name, m in self.mean.items()}
        self._handles = [layer.register_forward_pre_hook(self._hook(name)) for name, layer in self.layers]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(layer: nn.Module, args: tuple[Any, ...]) -> None:
            if not (layer.training and torch.is_grad_enabled()):
                return
            x = args[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dims, correction=1)
            m = self.momenta
            self.mean[name] = (1 - m) * self.mean[name] + m * mean
            self.var[name] = (1 - m) * self.var[name] + m * var

        return hook

    def load(self, model: nn.Module, k: int) -> None:
        """Put the ``k``-th momentum's statistics into ``model`` (the same architecture, e.g. a copy)."""
        layers = dict(batch_norm_layers(model))
        with torch.no_grad():
            for name, _ in self.layers:
                layers[name].running_mean.copy_(self.mean[name][k])
                layers[name].running_var.copy_(self.var[name][k])

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()


def effective_samples(momentum: float, batch_size: int) -> float:
    """The samples a uniform average needs for the variance of a moving average with ``momentum``
    over batches of ``batch_size`` (a stationary input): ``batch_size * (2 - m) / m``."""
    return batch_size * (2 - momentum) / momentum


def population_work(cfg: Any) -> int:
    """Training steps of the part (for progress bars)."""
    return cfg.population_seeds * len(cfg.population_norm_batches) * cfg.mlp_steps


def _tensors(data: Dataset) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test))


def _norm(v: int, batch_size: int) -> Callable[[int], nn.Module]:
    if v >= batch_size:
        return batchnorm.BatchNorm1d
    return lambda width: batchnorm.BatchNorm1d(width, virtual_batch_size=v)


def _score(model: nn.Module, x_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> dict[str, Any]:
    """The statistics error of ``model``'s running statistics (mean over layers of the output error, and per
    layer) against the moments over the whole training set in one batch, and its test accuracy."""
    errors = statistics_error(model.eval(), [x_train])
    return {
        "error": float(np.mean([e.output_error for e in errors])),
        "layer_errors": {e.name: e.output_error for e in errors},
        "test_acc": accuracy(model, x_test, y_test),
    }


def _estimates(model: nn.Module, averages: MovingAverages, tensors: tuple[torch.Tensor, ...], cfg: Any,
               seed: int) -> dict[str, Any]:  # fmt: skip
    """Every estimate of one trained network, scored."""
    x_train, _, x_test, y_test = tensors
    b = cfg.batch_size
    generator = torch.Generator().manual_seed(seed + 3)
    samples = [n for n in cfg.population_samples if n < len(x_train)]
    precise: dict[str, list[dict[str, Any]]] = {}
    for n in samples:
        draws = []
        for _ in range(cfg.population_draws):
            subset = x_train[torch.randperm(len(x_train), generator=generator)[:n]]
            draws.append(_score(with_precise_statistics(model, subset, b), x_train, x_test, y_test))
        precise[str(n)] = draws
    whole = _score(with_precise_statistics(model, x_train, b), x_train, x_test, y_test)
    moving = []
    for k, m in enumerate(cfg.population_momenta):
        estimate = copy.deepcopy(model)
        averages.load(estimate, k)
        moving.append({"momentum": m, "effective_samples": effective_samples(m, b),
                       **_score(estimate, x_train, x_test, y_test)})  # fmt: skip
    truth = with_precise_statistics(model, x_train, len(x_train))  # the whole set in one batch
    return {
        "precise": precise,
        "precise_whole_set": whole,
        "moving_average": moving,
        "as_trained": _score(copy.deepcopy(model), x_train, x_test, y_test),
        "truth_test_acc": accuracy(truth, x_test, y_test),
    }


def _accuracy_metric(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == target).double().mean()


def _gap(model: nn.Module, v: int, tensors: tuple[torch.Tensor, ...], seed: int) -> dict[str, Any]:
    """Batch against population statistics at normalization batch ``v``, on shuffled test and training sets (None
    for a set smaller than ``v``)."""
    x_train, y_train, x_test, y_test = tensors
    # whole ghosts only: chunks and the set cut to multiples of v, so no ghost has a single sample
    population = with_precise_statistics(model, x_train[: len(x_train) // v * v], v * -(-PRECISE_CHUNK // v))
    out: dict[str, Any] = {"eval_acc_as_trained": accuracy(model, x_test, y_test)}
    generator = torch.Generator().manual_seed(seed + 4)
    for split, x, y in (("test", x_test, y_test), ("train", x_train, y_train)):
        order = torch.randperm(len(x), generator=generator)
        # a set smaller than one batch of v (a tiny dataset) has no batch statistics to score
        out[split] = mode_gap(population, _accuracy_metric, x[order], y[order], v).as_dict() if len(x) >= v else None
    return out


def run_population(data: Dataset, cfg: Any, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per seed: the estimates of the plain-BN network, and per normalization batch size the train/eval gap."""
    tensors = _tensors(data)
    x_train, y_train, x_test, y_test = tensors
    seeds = [cfg.seed + s for s in range(cfg.population_seeds)]
    sizes = sorted(set(cfg.population_norm_batches))
    out: dict[str, Any] = {
        "model": "mlp", "lr": cfg.mlp_lr, "steps": cfg.mlp_steps, "batch": cfg.batch_size, "seeds": seeds,
        "norm_batches": sizes, "momenta": list(cfg.population_momenta), "layer_momentum": 0.1,
        "samples": [n for n in cfg.population_samples if n < len(x_train)], "whole_set": len(x_train),
        "draws": cfg.population_draws, "estimates": [], "gaps": {str(v): [] for v in sizes},
    }  # fmt: skip
    for seed in seeds:
        for v in sizes:
            model = mlp(int(np.prod(data.image_shape)), data.classes, bn=True, hidden=cfg.hidden,
                        init_std=cfg.init_std, seed=seed, norm=_norm(v, cfg.batch_size))  # fmt: skip
            averages = MovingAverages(model, cfg.population_momenta) if v >= cfg.batch_size else None
            history = train(model, x_train, y_train, x_test, y_test, steps=cfg.mlp_steps, lr=cfg.mlp_lr,
                            batch_size=cfg.batch_size, seed=seed, eval_every=cfg.mlp_steps,
                            progress=progress)  # fmt: skip
            if progress is not None and history.diverged_at is not None:
                progress(cfg.mlp_steps - history.diverged_at + 1)
            if averages is not None:
                averages.detach()
            if history.diverged_at is not None:
                out["gaps"][str(v)].append({"seed": seed, "diverged_at": history.diverged_at})
                continue
            out["gaps"][str(v)].append({"seed": seed, "diverged_at": None, **_gap(model, v, tensors, seed)})
            if averages is not None:
                out["estimates"].append({"seed": seed, **_estimates(model, averages, tensors, cfg, seed)})
    return out


def summarize_population(r: dict[str, Any]) -> dict[str, Any]:
    """Medians over seeds (and draws) of the statistics error and test accuracy of each estimate, and per
    normalization batch size the mean over seeds of both accuracies and the gap."""
    est = r["estimates"]
    out: dict[str, Any] = {"seeds_estimated": len(est)}
    if est:
        out["precise"] = {n: _medians([d for e in est for d in e["precise"][n]]) for n in map(str, r["samples"])}
        out["precise_whole_set"] = _medians([e["precise_whole_set"] for e in est])
        out["moving_average"] = {str(a["momentum"]): {"effective_samples": a["effective_samples"],
                                                      **_medians([e["moving_average"][k] for e in est])}
                                 for k, a in enumerate(est[0]["moving_average"])}  # fmt: skip
        out["as_trained"] = _medians([e["as_trained"] for e in est])
        out["truth_test_acc"] = float(np.median([e["truth_test_acc"] for e in est]))
        out["samples_to_match_moving_average"] = _samples_to_match(r, out)
    gaps: dict[str, Any] = {}
    for v, runs in r["gaps"].items():
        done = [g for g in runs if g["diverged_at"] is None]
        gaps[v] = {"diverged": len(runs) - len(done)}
        for split in ("test", "train"):
            scored = [g[split] for g in done if g[split] is not None]
            for key in ("batch_statistics", "population_statistics", "gap"):
                gaps[v][f"{split}_{key}"] = float(np.mean([g[key] for g in scored])) if scored else None
    out["gaps"] = gaps
    return out


def _medians(scores: list[dict[str, Any]]) -> dict[str, float]:
    return {"error": float(np.median([s["error"] for s in scores])),
            "test_acc": float(np.median([s["test_acc"] for s in scores]))}  # fmt: skip


def _samples_to_match(r: dict[str, Any], s: dict[str, Any]) -> int | None:
    """The fewest samples whose precise statistics have a median error at most the layers' own moving
    average's (momentum 0.1, as trained); None if no sample count tried does."""
    target = s["as_trained"]["error"]
    return next((n for n in r["samples"] if s["precise"][str(n)]["error"] <= target), None)
