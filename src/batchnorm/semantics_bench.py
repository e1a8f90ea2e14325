"""The batch-semantics modes of ``batchnorm bench``: what ghost batches and masks cost.

``ghost`` times a training forward+backward of our layer with ``virtual_batch_size``
(8 ghosts) and ``masked`` one with ``mask=`` (half the positions padded: sequences of
random lengths, or images padded right and below to the batch's size), each against
the same layer on the whole dense batch (``plain``, the cost the targets are relative
to), and against what torch offers for the same job: its batch-norm layer on each
ghost and a join (``torch``), and for masks batch norm written in torch ops around the
mask (``torch``; torch has no masked batch norm); ``torch.compile`` of those. Before
timing, our outputs and gradients are checked against torch's. The rounds of all
implementations are interleaved, so a busy machine slows them alike, and each round starts
with the next one, so none always runs after the same one (torch's ways allocate much more
memory, which costs the call after them page faults).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MODES = ("ghost", "masked")
GHOSTS = 8
PADDED = 0.5  # fraction of positions padded in the masked cases
TARGETS = {"ghost": 1.2, "masked": 1.15}  # at most this many times the dense layer's time
TOLERANCE = 1e-4  # relative to the largest magnitude


@dataclass(frozen=True)
class SemanticsCase:
    name: str
    shape: tuple[int, ...]
    channels_last: bool = False
    mask: str = ""  # masked cases: "lengths" (sequences) or "corner" (images padded right and below)


CASES = {
    "ghost": [
        SemanticsCase("64x64x28x28", (64, 64, 28, 28)),
        SemanticsCase("64x64x28x28-nhwc", (64, 64, 28, 28), channels_last=True),
        SemanticsCase("32x256x28x28", (32, 256, 28, 28)),
        SemanticsCase("32x256x28x28-nhwc", (32, 256, 28, 28), channels_last=True),
        SemanticsCase("4096x1024", (4096, 1024)),
    ],
    "masked": [
        SemanticsCase("seq-32x256x400", (32, 256, 400), mask="lengths"),
        SemanticsCase("seq-64x512x128", (64, 512, 128), mask="lengths"),
        SemanticsCase("img-32x64x56x56", (32, 64, 56, 56), mask="corner"),
        SemanticsCase("img-32x64x56x56-nhwc", (32, 64, 56, 56), channels_last=True, mask="corner"),
    ],
}
QUICK = {"ghost": [SemanticsCase("16x8x10x10", (16, 8, 10, 10))],
         "masked": [SemanticsCase("seq-8x8x40", (8, 8, 40), mask="lengths")]}  # fmt: skip


@dataclass
class SemanticsRow:
    mode: str
    case: str
    ms: dict[str, float]  # implementation -> median ms of forward+backward
    spread: float  # slowest round / fastest round, of the noisiest implementation

    @property
    def vs_plain(self) -> float:
        """Our layer's time over the same layer's on the dense batch (the targets' figure)."""
        return self.ms["ours"] / self.ms["plain"]

    def vs(self, other: str) -> float | None:
        return self.ms[other] / self.ms["ours"] if other in self.ms else None


def make_mask(case: SemanticsCase, gen: torch.Generator) -> torch.Tensor:
    """``PADDED`` of the positions padded: each sequence valid up to a random length (lengths
    spread evenly around half), or each image valid in a random top-left rectangle of about
    half its area."""
    n = case.shape[0]
    if case.mask == "lengths":
        length = case.shape[2]
        lengths = (torch.rand(n, generator=gen) * length * 2 * (1 - PADDED)).round().clamp(1, length).long()
        return torch.arange(length)[None] < lengths[:, None]
    h, w = case.shape[2:]
    side = (1 - PADDED) ** 0.5
    scale = 1 + 0.25 * (torch.rand(n, 2, generator=gen) * 2 - 1)  # each side within 25% of sqrt(1/2)
    heights = (scale[:, 0] * side * h).round().clamp(1, h).long()
    widths = (scale[:, 1] * side * w).round().clamp(1, w).long()
    rows = torch.arange(h)[None, :, None] < heights[:, None, None]
    cols = torch.arange(w)[None, None, :] < widths[:, None, None]
    return rows & cols


class TorchGhosts(nn.Module):
    """torch's batch-norm layer on each ghost of ``size`` samples, then one join: how ghost
    batch norm is written with torch (composer, tabnet, timm)."""

    def __init__(self, bn: nn.Module, size: int):
        super().__init__()
        self.bn, self.size = bn, size

    def forward(self, x):
        return torch.cat([self.bn(g) for g in x.split(self.size)])


class TorchMasked(nn.Module):
    """Training batch norm over the valid positions, written in torch ops around the mask
    (0 at the padded ones), with torch's layer's parameters."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x, mask):
        valid = mask.unsqueeze(1)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xs = torch.where(valid, x, 0.0)
        count = valid.sum()
        mean = xs.sum(dims, keepdim=True) / count
        centered = torch.where(valid, xs - mean, 0.0)
        var = (centered * centered).sum(dims, keepdim=True) / count
        y = centered * torch.rsqrt(var + self.bn.eps) * self.bn.weight.view(shape) + self.bn.bias.view(shape)
        return torch.where(valid, y, 0.0)


def _layers(case: SemanticsCase, mode: str, with_compile: bool) -> dict[str, Callable]:
    """Each implementation as a function of ``(x, mask)``."""
    import batchnorm

    c = case.shape[1]
    kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[len(case.shape)]
    size = -(-case.shape[0] // GHOSTS)
    feature = {"virtual_batch_size": size} if mode == "ghost" else {}
    ours = getattr(batchnorm, kind)(c, **feature)
    plain = getattr(batchnorm, kind)(c)
    theirs = getattr(nn, kind)(c)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    for layer in (plain, theirs):
        layer.load_state_dict(ours.state_dict())
    wrapped = TorchGhosts(theirs, size) if mode == "ghost" else TorchMasked(theirs)
    impls: dict[str, Callable] = {
        "ours": (lambda x, m: ours(x)) if mode == "ghost" else (lambda x, m: ours(x, mask=m)),
        "plain": lambda x, m: plain(x),
        "torch": (lambda x, m: wrapped(x)) if mode == "ghost" else wrapped,
    }
    if with_compile:
        torch._dynamo.reset()
        compiled = torch.compile(wrapped)
        impls["compile"] = (lambda x, m: compiled(x)) if mode == "ghost" else compiled
    return impls


def _step(fn: Callable, x: torch.Tensor, mask: torch.Tensor | None, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x.grad = None
    y = fn(x, mask)
    y.backward(dy)
    return y.detach(), x.grad


def bench_case(case: SemanticsCase, mode: str, repeats: int, with_compile: bool) -> SemanticsRow:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen) * 2 + 0.5
    dy = torch.randn(case.shape, generator=gen)
    if case.channels_last:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    mask = make_mask(case, gen) if mode == "masked" else None
    impls = _layers(case, mode, with_compile)
    results = {name: _step(fn, x, mask, dy) for name, fn in impls.items()}  # warm-up: compile, allocate
    for name in ("torch", "compile"):
        if name in results:
            for what, got, want in zip(("y", "dx"), results["ours"], results[name], strict=True):
                err = float((got - want).abs().max())
                if not err <= TOLERANCE * max(1.0, float(want.abs().max())):
                    raise AssertionError(f"{mode} {case.name}: our {what} differs from {name}'s by {err:.3e}")
    times: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for round_ in range(repeats):  # each round starts with the next implementation: none always follows
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # the same (e.g. a big allocator)
            began = time.perf_counter()
            _step(impls[name], x, mask, dy)
            times[name].append(time.perf_counter() - began)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return SemanticsRow(mode, case.name, ms, max(max(t) / min(t) for t in times.values()))


def header(repeats: int) -> list[str]:
    return [
        f"### Batch semantics: ghost batches ({GHOSTS} ghosts) and masks ({PADDED:.0%} padded), training "
        f"forward+backward, float32, {torch.get_num_threads()} threads (medians of {repeats} rounds)",
        "",
        "plain: our layer on the dense batch, no ghosts or mask; torch: torch's layer per ghost and a join, or "
        "batch norm in torch ops around the mask; ours/plain is the figure the targets speak of.",
        "",
        "| mode | case | ours ms | plain ms | ours/plain | torch ms | vs torch | vs compile |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]


def markdown_row(r: SemanticsRow) -> str:
    mark = "~" if r.spread > 1.2 else ""
    compiled = r.vs("compile")
    return (
        f"| {r.mode} | {r.case} | {r.ms['ours']:.2f} | {r.ms['plain']:.2f} | {r.vs_plain:.2f}{mark} | "
        f"{r.ms['torch']:.2f} | {r.vs('torch'):.2f}x | {'-' if compiled is None else f'{compiled:.2f}x'} |"
    )


def summary(rows: list[SemanticsRow]) -> list[str]:
    out = []
    for mode in MODES:
        mine = [r for r in rows if r.mode == mode]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r.vs_plain)
        target = TARGETS[mode]
        verdict = "met" if worst.vs_plain <= target else "not met"
        geo = statistics.geometric_mean([r.vs("torch") for r in mine])
        out.append(
            f"- {mode}: at most {worst.vs_plain:.2f}x the dense layer's time ({worst.case}; target <= {target:g}x: "
            f"{verdict}), median {statistics.median(r.vs_plain for r in mine):.2f}x; {geo:.2f}x torch's way (geomean)"
        )
    return out


def report(modes: list[str], repeats: int, quick: bool, with_compile: bool,
           emit: Callable[[str], None] = print) -> list[str]:  # fmt: skip
    """Times every case of ``modes``; the markdown lines, each also passed to ``emit``."""
    lines: list[str] = []

    def add(*new: str) -> None:
        for line in new:
            lines.append(line)
            emit(line)

    add(*header(repeats))
    rows = []
    for mode in modes:
        for case in (QUICK if quick else CASES)[mode]:
            rows.append(bench_case(case, mode, repeats, with_compile))
            add(markdown_row(rows[-1]))
    add("", *summary(rows))
    return lines
