"""Training loops: one model with plain SGD, or a :class:`MLPEnsemble` for the learning-rate sweep.

Both draw mini-batches with :class:`BatchSampler` (a fresh permutation of the
training set per epoch, from the run's seed), so a run is fully determined by
its seed, and member ``k`` of an ensemble sees the batches a single run with
the same seed would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .models import MLPEnsemble

__all__ = ["DIVERGED_LOSS", "BatchSampler", "History", "SweepResult", "accuracy", "train", "train_ensemble"]

# A run has diverged when its training loss is non-finite or above this: a cross-entropy of 1e4
# means logits 1e4 apart on a wrong class, which saturated sigmoids alone can never produce.
DIVERGED_LOSS = 1e4


class BatchSampler:
    """Indices of ``batch_size`` training examples per step; reshuffled every epoch (incomplete tail dropped)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if not 0 < batch_size <= n:
            raise ValueError(f"batch size must be between 1 and the training set size {n}, got {batch_size}")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(self.n, generator=self.generator)
            self._pos = 0
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> float:
    """Test accuracy in eval mode (population statistics); the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(
            int((model(x[i : i + chunk]).argmax(-1) == y[i : i + chunk]).sum()) for i in range(0, len(x), chunk)
        )
    finally:
        model.train(was_training)
    return correct / len(x)


@dataclass
class History:
    """One run's curves; ``train_loss[i]`` is the mean training loss over the steps since the previous evaluation."""

    steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    diverged_at: int | None = None

    def steps_to(self, target: float) -> int | None:
        """The first evaluated step with test accuracy >= ``target`` (None if never)."""
        return next((s for s, a in zip(self.steps, self.test_acc, strict=True) if a >= target), None)


def train(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    eval_every: int,
    before_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    after_eval: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> History:
    """Plain SGD on cross-entropy; evaluates at step 0 and every ``eval_every`` steps.

    ``before_step(step, xb, yb)`` runs before each update (gradient ICS needs the
    step's batch and the parameters before it), ``after_eval(step)`` after each
    evaluation (input percentiles). A non-finite loss, or one above
    ``DIVERGED_LOSS``, stops the run and is recorded as ``diverged_at``.
    """
    sampler = BatchSampler(len(x_train), batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    history = History()
    model.train()

    def evaluate(step: int, losses: list[float]) -> None:
        history.steps.append(step)
        history.test_acc.append(accuracy(model, x_test, y_test))
        history.train_loss.append(sum(losses) / len(losses) if losses else math.nan)
        if after_eval is not None:
            after_eval(step)

    evaluate(0, [])
    losses: list[float] = []
    for step in range(1, steps + 1):
        idx = sampler.next()
        xb, yb = x_train[idx], y_train[idx]
        if before_step is not None:
            before_step(step, xb, yb)
        loss = F.cross_entropy(model(xb), yb)
        if not loss.item() <= DIVERGED_LOSS:  # also catches NaN
            history.diverged_at = step
            break
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():  # plain SGD (torch.optim would import torch._dynamo: seconds)
            torch._foreach_add_(params, grads, alpha=-lr)
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            evaluate(step, losses)
            losses = []
        if progress is not None:
            progress(1)
    return history


@dataclass
class SweepResult:
    """Per member: curves (``test_acc[k]`` at ``steps``) and the step it diverged at, if it did."""

    lrs: list[float]
    seeds: list[int]
    steps: list[int]
    test_acc: list[list[float]]
    final_loss: list[float]
    diverged_at: list[int | None]


def train_ensemble(
    ensemble: MLPEnsemble,
    lrs: list[float],
    seeds: list[int],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    eval_every: int,
    progress: Callable[[int], None] | None = None,
) -> SweepResult:
    """Train every member with its own learning rate and seed, as :func:`train` would.

    A member whose loss turns non-finite or exceeds ``DIVERGED_LOSS`` is marked diverged at that step and
    frozen (weights zeroed, learning rate 0) so that it cannot disturb the others.
    """
    k = ensemble.members
    if len(lrs) != k or len(seeds) != k:
        raise ValueError(f"need one learning rate and one seed per member ({k})")
    samplers = [BatchSampler(len(x_train), batch_size, s) for s in seeds]
    lr_t = torch.tensor(lrs, dtype=torch.float32)
    diverged: list[int | None] = [None] * k
    result = SweepResult(list(lrs), list(seeds), [], [[] for _ in range(k)], [math.nan] * k, diverged)
    flat_train = x_train.flatten(1)
    flat_test = x_test.flatten(1)

    @torch.no_grad()
    def evaluate(step: int) -> None:
        ensemble.eval()
        chunk = 500  # members x chunk x features stays small even for CIFAR-10
        logits = torch.cat(
            [ensemble(flat_test[i : i + chunk, None].expand(-1, k, -1)) for i in range(0, len(flat_test), chunk)]
        )
        acc = (logits.argmax(-1) == y_test[:, None]).double().mean(0)  # K
        ensemble.train()
        result.steps.append(step)
        for j in range(k):
            result.test_acc[j].append(math.nan if diverged[j] is not None else float(acc[j]))

    ensemble.train()
    evaluate(0)
    for step in range(1, steps + 1):
        idx = torch.stack([s.next() for s in samplers], dim=1)  # B,K
        logits = ensemble(flat_train[idx])  # B,K,classes
        per_member = F.cross_entropy(logits.permute(0, 2, 1), y_train[idx], reduction="none").mean(0)  # K
        bad = ~(per_member.detach() <= DIVERGED_LOSS)  # also catches NaN
        for j in bad.nonzero().flatten().tolist():
            diverged[j] = step if diverged[j] is None else diverged[j]
            lr_t[j] = 0.0
        ensemble.zero_grad(set_to_none=True)
        per_member.masked_fill(bad, 0.0).sum().backward()
        ensemble.sgd_step(lr_t)
        if bad.any():  # after the backward, which needs the weights as they were
            with torch.no_grad():
                for p in ensemble.parameters():
                    p.view(k, -1)[bad] = 0.0
        if step % eval_every == 0 or step == steps:
            evaluate(step)
        if step == steps:
            result.final_loss = [
                math.nan if d is not None else float(v) for d, v in zip(diverged, per_member.detach(), strict=True)
            ]
        if progress is not None:
            progress(1)
    return result
