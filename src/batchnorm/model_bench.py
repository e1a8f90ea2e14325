"""The whole-model modes of ``batchnorm bench``: what a user feels after converting a model.

``model-train`` times a whole training step (forward, cross-entropy loss, backward,
SGD with momentum) of torchvision's ResNets (or ``tiny-resnet``, the ResNet-style net of
``batchnorm.experiments``, which needs no torchvision); ``model-eval`` times an eval
forward, the inference comparison. Each model runs as torch builds it (``torch``), after
``batchnorm.convert`` (``convert``), after ``batchnorm.fuse(batchnorm.convert(model))``
(``fuse``) and, in eval, with every batch norm frozen to its multiply-add
(``batchnorm.freeze``: ``freeze``) and folded away (``batchnorm.fold``: ``fold``), all
from the same weights; the variants' rounds are interleaved, so a busy machine slows
all of them alike.

Batch norm's share of the time is measured by ablation: the same model with every
batch-norm layer replaced by what it leaves when the normalization is taken out
(``nn.Identity`` for torch's layers; the fused activation, after the residual add,
for ours), timed in the same rounds (``no-BN``). A variant's share is
``(its time - no-BN's) / its time``. Before timing, the variants' outputs are
checked against torch's (training-mode logits from the same weights, and eval).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import _torchvision, activations
from .usage import UsageError

TRAIN_VARIANTS = ("torch", "convert", "fuse")
EVAL_VARIANTS = ("torch", "convert", "fuse", "freeze", "fold")
TARGET_TRAIN = {"resnet50": 1.3}  # fuse vs torch, training step
TOLERANCE = 1e-3  # logits, relative to their largest magnitude


@dataclass
class ModelRow:
    model: str
    mode: str
    variant: str
    ms: float
    torch_ms: float
    no_bn_ms: float
    spread: float  # slowest round / fastest round of this variant

    @property
    def vs_torch(self) -> float:
        return self.torch_ms / self.ms

    @property
    def bn_share(self) -> float:
        return max(0.0, (self.ms - self.no_bn_ms) / self.ms)


class _WithoutNorm(nn.Module):
    """A batch-norm layer with the normalization taken out: ``act(x + residual)``."""

    def __init__(self, act: activations.Activation):
        super().__init__()
        self.act = act

    def forward(self, x, residual=None):
        y = x if residual is None else x + residual
        return activations.forward(y, self.act)


def without_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every batch-norm layer replaced by :class:`_WithoutNorm`."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            act = getattr(module, "activation", activations.IDENTITY)
            setattr(parent, child, _WithoutNorm(act))
    return model


def build(name: str) -> nn.Module:
    if name == "tiny-resnet":
        from .experiments.resnet import TinyResNet

        torch.manual_seed(0)
        return TinyResNet(classes=1000)
    try:
        torchvision = _torchvision.load()
    except ImportError:
        raise UsageError("the model modes need torchvision: pip install torchvision (or batchnorm[bench])") from None
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None)


def variants(model: nn.Module, mode: str) -> dict[str, nn.Module]:
    """The model as torch builds it and after our transforms, from the same weights, plus its
    ``no-BN`` ablation."""
    import batchnorm

    out = {"torch": model, "convert": batchnorm.convert(copy.deepcopy(model))}
    out["fuse"] = batchnorm.fuse(batchnorm.convert(copy.deepcopy(model)))
    if mode == "model-eval":
        out["freeze"] = batchnorm.freeze(copy.deepcopy(model).eval())
        out["fold"] = batchnorm.fold(batchnorm.convert(copy.deepcopy(model)).eval())
    out["no-BN"] = without_norm(model)
    for m in out.values():
        m.train(mode == "model-train")
    return out


def _check(models: dict[str, nn.Module], x: torch.Tensor, mode: str, name: str) -> None:
    """Every variant's logits against torch's, from the same weights (before any step)."""
    with torch.no_grad():
        # training mode updates the running statistics: run copies, so every variant starts alike
        logits = {v: (copy.deepcopy(m) if mode == "model-train" else m)(x) for v, m in models.items() if v != "no-BN"}
    want = logits["torch"]
    scale = float(want.abs().max())
    for variant, got in logits.items():
        err = float((got - want).abs().max())
        if not err <= TOLERANCE * max(1.0, scale):
            raise AssertionError(f"{name} {mode}: {variant}'s logits differ from torch's by {err:.3e}")


def _train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()

    return step


def _eval_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def bench_model(name: str, mode: str, batch: int, size: int, repeats: int) -> list[ModelRow]:
    """Rows of one model and mode: each variant's median time, against torch's and no-BN's."""
    model = build(name)
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))
    models = variants(model, mode)
    _check(models, x, mode, name)
    steps = {v: _train_step(m, x, labels) if mode == "model-train" else _eval_step(m, x) for v, m in models.items()}
    for step in steps.values():  # warm-up: first calls compile kernels, allocate, fault pages in
        step()
        step()
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            began = time.perf_counter()
            step()
            times[variant].append(time.perf_counter() - began)
    ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    return [
        ModelRow(name, mode, v, ms[v], ms["torch"], ms["no-BN"], max(times[v]) / min(times[v]))
        for v in steps
        if v != "no-BN"
    ]


def header(batch: int, size: int, repeats: int) -> list[str]:
    return [
        f"### Whole models: ResNets, batch {batch}, 3x{size}x{size}, float32, "
        f"{torch.get_num_threads()} threads (medians of {repeats} rounds)",
        "",
        "model-train: forward, cross-entropy, backward, SGD step; model-eval: forward under no_grad. "
        "BN share: (time - time with batch norm taken out) / time.",
        "",
        "| model | mode | variant | ms | vs torch | BN share |",
        "|---|---|---|---:|---:|---:|",
    ]


def markdown_row(r: ModelRow) -> str:
    mark = "~" if r.spread > 1.2 else ""
    return f"| {r.model} | {r.mode} | {r.variant} | {r.ms:.1f} | {r.vs_torch:.2f}x{mark} | {r.bn_share:.0%} |"


def summary(rows: list[ModelRow]) -> list[str]:
    """The figures the targets speak of: the training step after ``fuse``, and no eval forward
    slower than torch's."""
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        train = {r.variant: r for r in rows if r.model == model and r.mode == "model-train"}
        if train:
            fuse, target = train["fuse"], TARGET_TRAIN.get(model)
            verdict = (
                "" if target is None else f" (target >= {target:g}x: {'met' if fuse.vs_torch >= target else 'not met'})"
            )
            out.append(
                f"- {model} training step: fuse {fuse.vs_torch:.2f}x torch{verdict}, convert "
                f"{train['convert'].vs_torch:.2f}x; batch norm's share of the step: torch "
                f"{train['torch'].bn_share:.0%}, fuse {fuse.bn_share:.0%}"
            )
        evals = [r for r in rows if r.model == model and r.mode == "model-eval" and r.variant != "torch"]
        if evals:
            slower = [r for r in evals if r.vs_torch < 1.0]
            figures = ", ".join(f"{r.variant} {r.vs_torch:.2f}x" for r in evals)
            out.append(
                f"- {model} eval forward: {figures} torch (target: none slower than torch: "
                f"{'not met, ' + ', '.join(r.variant for r in slower) if slower else 'met'})"
            )
    return out


def report(
    names: list[str], modes: list[str], batch: int, size: int, repeats: int, emit: Callable[[str], None] = print
) -> list[str]:
    """Times every model in every mode; the markdown lines (a table and its summary), each also
    passed to ``emit`` as soon as it is known."""
    lines: list[str] = []

    def add(*new: str) -> None:
        for line in new:
            lines.append(line)
            emit(line)

    add(*header(batch, size, repeats))
    rows: list[ModelRow] = []
    for name in names:
        for mode in modes:
            for row in bench_model(name, mode, batch, size, repeats):
                rows.append(row)
                add(markdown_row(row))
    add("", *summary(rows))
    return lines
