"""``batchnorm bench``: our layers against torch eager and torch.compile, side by side.

For each case (a layer shape and memory layout) and mode it checks our results
against torch eager (and against ``batchnorm.reference`` for plain layers up to
4M elements), then times the three implementations interleaved (one call of each
per round, so a noisy machine slows all of them alike) and reports medians.

Modes: ``train-fwd``, ``train-fwdbwd`` and ``eval`` time the plain layer;
``fused-relu`` and ``fused-add-relu`` time forward+backward of the fused blocks
``relu(BN(x))`` and ``relu(BN(x) + r)``: our layer with ``activation="relu"``
against torch's BN, add and ReLU as separate modules (eager, and compiled). With
the fused modes selected, a memory report follows the table: bytes kept for the
backward per block, and the saved and peak bytes of a training step of the
ResNet-style client (``experiments.resnet``), ours after ``batchnorm.fuse``
against torch's layers (``batchnorm.memory``).

Bandwidth napkin math, the fewest bytes each mode must move (element size s,
n elements): train forward reads x and writes y (2ns); the backward reads x and
dy and writes dx (3ns), so train forward+backward is 5ns; eval reads x and
writes y (2ns); ``fused-relu`` moves what train forward+backward does (5ns),
``fused-add-relu`` also reads r and writes its gradient (7ns). The C-sized
parameters, statistics and the 1-bit sign mask are ignored. "GB/s" is
that byte count over our median time, "% copy" its fraction of the machine's
copy bandwidth (``dst.copy_(src)`` into an existing 256 MiB buffer, counted as
read + write), measured at start. A freshly allocated output costs page faults
on top of that (shown as the "fresh-copy" figure: ``src.clone()``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from .usage import UsageError

PLAIN_MODES = ("train-fwd", "train-fwdbwd", "eval")
FUSED_MODES = ("fused-relu", "fused-add-relu")
MODES = PLAIN_MODES + FUSED_MODES
BYTES_PER_ELEMENT_MOVED = {  # in units of n * itemsize
    "train-fwd": 2,
    "train-fwdbwd": 5,
    "eval": 2,
    "fused-relu": 5,
    "fused-add-relu": 7,
}
FUSED_RELU_TARGET = 3.0  # geomean vs torch eager on the ResNet-50 set
LARGE_NUMEL = 1 << 23  # "large cases" for the bandwidth targets: 8M elements (32 MiB float32) and up
REFERENCE_MAX_NUMEL = 1 << 22
NOISY_SPREAD = 1.2  # rounds of one timing that differ by more than this: the machine is busy


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # "resnet50", "mlp", "small"
    shape: tuple[int, ...]
    channels_last: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _resnet50_cases(batch: int = 32) -> list[Case]:
    """The distinct BatchNorm2d input shapes of torchvision's ResNet-50 at 224x224."""
    shapes = [  # (channels, side)
        (64, 112),  # stem
        (64, 56), (256, 56),  # layer1
        (128, 56), (128, 28), (512, 28),  # layer2
        (256, 28), (256, 14), (1024, 14),  # layer3
        (512, 14), (512, 7), (2048, 7),  # layer4
    ]  # fmt: skip
    cases = []
    for channels_last in (False, True):
        for c, side in shapes:
            tag = "nhwc" if channels_last else "nchw"
            cases.append(Case(f"r50-{c}x{side}-{tag}", "resnet50", (batch, c, side, side), channels_last))
    return cases


def all_cases() -> list[Case]:
    return [
        *_resnet50_cases(),
        Case("mlp-256x1024", "mlp", (256, 1024)),
        Case("mlp-4096x4096", "mlp", (4096, 4096)),
        Case("small-8x16x8x8", "small", (8, 16, 8, 8)),
        Case("small-32x64", "small", (32, 64)),
        Case("small-4x32x16x16-nhwc", "small", (4, 32, 16, 16), True),
    ]


QUICK_CASES = ("small-8x16x8x8", "small-32x64", "small-4x32x16x16-nhwc", "r50-2048x7-nhwc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--cases", default="", help="comma-separated substrings; run only cases whose name has one")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--quick", action="store_true", help="a few small cases, few repeats: seconds, for tests")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for results.md and results.csv (files of an earlier bench run there are "
                        "replaced, nothing else is touched)")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="leave out the fused layers' memory report")


@dataclass
class Row:
    case: Case
    mode: str
    ours_ms: float
    torch_ms: float
    compile_ms: float | None
    gbps: float
    frac_copy: float
    spread: float = field(default=1.0)  # slowest round / fastest round, of the noisiest implementation

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    @property
    def vs_torch(self) -> float:
        return self.torch_ms / self.ours_ms

    @property
    def vs_compile(self) -> float | None:
        return None if self.compile_ms is None else self.compile_ms / self.ours_ms


def _checked(args: argparse.Namespace) -> tuple[list[str], list[Case]]:
    """The modes and cases asked for; a bad option is a usage error naming it (before any work)."""
    for option in ("repeats", "threads"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            raise UsageError(f"--{option} must be a positive integer, got {value}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise UsageError(f"--modes: unknown mode {mode!r}; expected some of {', '.join(MODES)}")
    cases = _select_cases(args)
    if not cases:
        raise UsageError(f"--cases: no case matches {args.cases!r}")
    return modes, cases


def run(args: argparse.Namespace) -> int:
    import os
    import platform
    import time

    modes, cases = _checked(args)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    repeats = args.repeats or (3 if args.quick else 7)
    folder = None
    if args.out:  # files of an earlier bench run there are replaced, nothing else
        from .run_folder import RunFolder

        folder = RunFolder(args.out, "bench")
        folder.check(["results.md", "results.csv"])

    copy_gbps, fresh_gbps = _copy_bandwidth(device, quick=args.quick)
    import batchnorm

    chosen = batchnorm.kernels.select(torch.empty(2, 2, 2, device=device, dtype=dtype)).name
    header = (
        f"# batchnorm bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dtype}, "
        f"backend {chosen!r}\n"
        f"copy bandwidth {copy_gbps:.1f} GB/s (into an existing buffer), "
        f"{fresh_gbps:.1f} GB/s (fresh output, page faults included); medians of {repeats} rounds"
    )
    print(header, "", LEGEND, "", _markdown_header(), sep="\n", flush=True)

    rows: list[Row] = []
    started = time.perf_counter()
    for case in cases:
        for mode in modes:
            rows.append(_bench_one(case, mode, device, dtype, repeats, not args.no_compile, copy_gbps))
            print(_markdown_row(rows[-1]), flush=True)
    summary = [*_summary(rows), *_noise_note(rows, repeats)]
    memory: list[str] = []
    if not args.no_memory and any(m in FUSED_MODES for m in modes) and device.type == "cpu":
        memory = ["", *memory_report(quick=args.quick)]
    table = "\n".join([header, "", LEGEND, "", _markdown_header(), *map(_markdown_row, rows), "", *summary, *memory])
    print("", *summary, f"({time.perf_counter() - started:.0f} s)", *memory, sep="\n")
    if folder is not None:
        staged = folder.stage()
        try:
            (staged / "results.md").write_text(table + "\n")
            (staged / "results.csv").write_text(_csv(rows))
            folder.publish()
        except BaseException:
            folder.discard()
            raise
        print(f"wrote {folder.out / 'results.md'} and results.csv")
    return 0


def _select_cases(args) -> list[Case]:
    cases = all_cases()
    if args.quick and not args.cases:
        return [c for c in cases if c.name in QUICK_CASES]
    wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
    return [c for c in cases if not wanted or any(w in c.name for w in wanted)]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_bandwidth(device, quick: bool) -> tuple[float, float]:
    """Read + write GB/s of a 256 MiB copy (16 MiB with --quick): into a buffer, and into a fresh one."""
    import statistics
    import time

    import torch

    n = (1 << 22) if quick else (1 << 26)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    into, fresh = [], []
    for _ in range(3 if quick else 7):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        into.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = src.clone()
        _sync(device)
        fresh.append(time.perf_counter() - start)
        del out
    nbytes = 2 * n * src.element_size()
    return nbytes / statistics.median(into) / 1e9, nbytes / statistics.median(fresh) / 1e9


def _eager_block():
    """torch's way of writing ``relu(BN(x) [+ r])``: separate modules, as in torchvision."""
    import torch

    class EagerBlock(torch.nn.Module):
        def __init__(self, bn: torch.nn.Module):
            super().__init__()
            self.bn = bn
            self.relu = torch.nn.ReLU()

        def forward(self, x, r=None):
            y = self.bn(x)
            if r is not None:
                y = y + r
            return self.relu(y)

    return EagerBlock


def _layers(case: Case, device, dtype, mode: str = "train-fwd"):
    """(ours, torch) layers with the same parameters, in train mode; for a fused mode, our layer
    with ``activation="relu"`` and torch's BN + ReLU modules."""
    import torch

    import batchnorm

    c = case.shape[1]
    kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(case.shape)]
    extra = {"activation": "relu"} if mode in FUSED_MODES else {}
    ours = getattr(batchnorm, kind)(c, device=device, dtype=dtype, **extra)
    theirs = getattr(torch.nn, kind)(c, device=device, dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
        theirs.load_state_dict(ours.state_dict())
    if mode in FUSED_MODES:
        theirs = _eager_block()(theirs)
    return ours, theirs


def _inputs(case: Case, device, dtype):
    import torch

    x = torch.randn(case.shape, device=device, dtype=dtype) * 2 + 0.5
    dy = torch.randn(case.shape, device=device, dtype=dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x, dy


def _step(layer, x, dy, mode, r=None):
    """One call of ``mode``; returns what is compared: output (and gradients)."""
    if mode == "train-fwdbwd" or mode in FUSED_MODES:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        if r is None:
            y = layer(x)
        else:
            r.grad = None
            y = layer(x, r)
        y.backward(dy)
        weight, bias = layer.parameters()
        return y, x.grad, weight.grad, bias.grad, *(() if r is None else (r.grad,))
    return (layer(x),)


def _bench_one(case: Case, mode: str, device, dtype, repeats: int, with_compile: bool, copy_gbps: float) -> Row:
    import statistics
    import time

    import torch

    x, dy = _inputs(case, device, dtype)
    r = torch.randn_like(x).requires_grad_() if mode == "fused-add-relu" else None
    ours, theirs = _layers(case, device, dtype, mode)
    x.requires_grad_(mode == "train-fwdbwd" or mode in FUSED_MODES)
    impls = {"ours": ours, "torch": theirs}
    if with_compile:
        # A fresh start per case: shapes specialized as in a whole-model graph, and no
        # silent fall-back to eager once the recompilation limit is reached.
        torch._dynamo.reset()
        compiled = _layers(case, device, dtype, mode)[1]
        compiled.load_state_dict(theirs.state_dict())
        impls["compile"] = torch.compile(compiled)
    for layer in impls.values():
        layer.train(mode != "eval")
    if mode == "eval":  # give eval something other than the initial buffers
        with torch.no_grad():
            for layer in (ours, theirs, *([compiled] if with_compile else [])):
                layer.running_mean.copy_(torch.linspace(-1, 1, case.shape[1]))
                layer.running_var.copy_(torch.linspace(0.5, 2, case.shape[1]))

    grad_ctx = torch.enable_grad if x.requires_grad else torch.no_grad
    with grad_ctx():
        results = {name: _step(layer, x, dy, mode, r) for name, layer in impls.items()}  # warm-up, compile
        _validate(case, mode, {**results, "block": theirs, "residual": r}, x, dy, ours)
        for layer in impls.values():  # a second warm-up: compiled backward, caches
            _step(layer, x, dy, mode, r)
        times: dict[str, list[float]] = {name: [] for name in impls}
        for _ in range(repeats):
            for name, layer in impls.items():
                _sync(device)
                start = time.perf_counter()
                _step(layer, x, dy, mode, r)
                _sync(device)
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    nbytes = BYTES_PER_ELEMENT_MOVED[mode] * case.numel * x.element_size()
    gbps = nbytes / (ms["ours"] / 1e3) / 1e9
    spread = max(max(t) / min(t) for t in times.values())  # slowest over fastest round, worst implementation
    return Row(case, mode, ms["ours"], ms["torch"], ms.get("compile"), gbps, gbps / copy_gbps, spread)


def _validate(case: Case, mode: str, results, x, dy, ours) -> None:
    """Ours against torch eager (every case) and the float64 reference (small cases)."""
    import numpy as np
    import torch

    from batchnorm import reference

    names = ["y", "dx", "dweight", "dbias", "dresidual"]
    expected = results["torch"]
    if mode in FUSED_MODES:
        # Where the pre-activation is within rounding of 0, the two implementations may take the
        # ReLU's kink on different sides, and with few values per channel one such element moves
        # every gradient of its channel. So the gradients are checked against torch's batch norm
        # (eager) differentiated with ReLU's derivative taken where our forward let z through; the
        # outputs, against torch's, agree anyway (at the kink both are within rounding of 0).
        expected = _torch_with_our_relu_mask(results, x, dy, mode)
    for name, got, want in zip(names, results["ours"], expected, strict=False):
        got, want = got.detach(), want.detach()
        scale = float(want.abs().max()) if want.numel() else 1.0
        tol = 1e-4 if x.dtype == torch.float32 else 1e-9
        if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * max(1.0, scale)):
            err = float((got - want).abs().max())
            raise AssertionError(f"{case.name} {mode}: {name} differs from torch eager by {err:.3e}")
        if name in ("y", "dx", "dresidual") and got.stride() != want.stride():
            raise AssertionError(f"{case.name} {mode}: {name} strides {got.stride()} != torch's {want.stride()}")
    if case.numel > REFERENCE_MAX_NUMEL or mode in FUSED_MODES:
        return
    xs = x.detach().double().cpu().numpy()
    gamma = ours.weight.detach().double().cpu().numpy()
    beta = ours.bias.detach().double().cpu().numpy()
    if mode == "eval":
        a, b = reference.inference_affine(
            ours.running_mean.double().cpu().numpy(), ours.running_var.double().cpu().numpy(), gamma, beta, ours.eps
        )
        expected = [reference.inference(xs, a, b)]
    else:
        y_ref, cache = reference.forward(xs, gamma, beta, ours.eps)
        expected = [y_ref]
        if mode == "train-fwdbwd":
            dx, dgamma, dbeta = reference.backward(dy.double().cpu().numpy(), cache)
            expected += [dx, dgamma, dbeta]
    for name, got, want in zip(names, results["ours"], expected, strict=False):
        err = float(np.abs(got.detach().double().cpu().numpy() - want).max())
        tol = (1e-4 if x.dtype == torch.float32 else 1e-9) * max(1.0, float(np.abs(want).max()))
        if err > tol:
            raise AssertionError(f"{case.name} {mode}: {name} differs from the reference by {err:.3e}")


def _torch_with_our_relu_mask(results, x, dy, mode):
    """(y, dx, dweight, dbias[, dresidual]) of torch's eager block, with the ReLU's derivative
    taken from our output's sign (``results["ours"][0] > 0``) instead of torch's own."""
    import copy

    import torch

    bn = copy.deepcopy(results["block"].bn)  # torch's BN, its parameters as they were
    xx = x.detach().clone().requires_grad_()
    with torch.enable_grad():
        z = bn(xx)
        rr = None
        if mode == "fused-add-relu":
            rr = results["residual"].detach().clone().requires_grad_()
            z = z + rr
        z.backward(dy * (results["ours"][0] > 0))
    return torch.relu(z.detach()), xx.grad, bn.weight.grad, bn.bias.grad, *(() if rr is None else (rr.grad,))


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


LEGEND = (
    "ours = this package's layer; torch = torch.nn's layer, eager; compile = torch.compile of torch's layer. "
    "ms: median of the rounds. vs torch, vs compile: their time / ours (above 1: ours is faster). "
    "GB/s: the fewest bytes the mode must move / our time; % copy: that, of the copy bandwidth above. "
    "~ after a ratio: its rounds differed by more than 20%."
)


def _noise_note(rows: list[Row], repeats: int) -> list[str]:
    noisy = [r for r in rows if r.noisy]
    if not noisy:
        return []
    return [
        f"- noisy timings: in {len(noisy)} of {len(rows)} rows (marked ~) the slowest round took over "
        f"{NOISY_SPREAD:.1f}x the fastest (worst {max(r.spread for r in noisy):.1f}x): the machine was busy. "
        f"For stable figures run on an idle machine, with more --repeats (now {repeats}), and run twice."
    ]


def _verdict(value: float, target: float, at_least: bool = True) -> str:
    met = value >= target if at_least else value <= target
    return f"target {'>=' if at_least else '<='} {target:g}x: {'met' if met else 'not met'}"


def _markdown_header() -> str:
    return (
        "| case | shape | mode | ours ms | torch ms | compile ms | vs torch | vs compile | GB/s | % copy |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )


def _markdown_row(r: Row) -> str:
    shape = "x".join(map(str, r.case.shape))
    mark = "~" if r.noisy else ""
    return (
        f"| {r.case.name} | {shape} | {r.mode} | {r.ours_ms:.3f} | {r.torch_ms:.3f} | {_fmt(r.compile_ms, '.3f')} "
        f"| {r.vs_torch:.2f}x{mark} | {_fmt(r.vs_compile, '.2f')}{'x' if r.vs_compile else ''}"
        f"{mark if r.vs_compile else ''} | {r.gbps:.1f} | {r.frac_copy:.0%} |"
    )


def _csv(rows: list[Row]) -> str:
    lines = ["case,group,shape,channels_last,mode,ours_ms,torch_ms,compile_ms,vs_torch,vs_compile,gbps,frac_copy,"
             "spread"]  # fmt: skip
    for r in rows:
        lines.append(
            ",".join(
                [
                    r.case.name,
                    r.case.group,
                    "x".join(map(str, r.case.shape)),
                    str(r.case.channels_last),
                    r.mode,
                    f"{r.ours_ms:.4f}",
                    f"{r.torch_ms:.4f}",
                    _fmt(r.compile_ms, ".4f").replace("-", ""),
                    f"{r.vs_torch:.3f}",
                    _fmt(r.vs_compile, ".3f").replace("-", ""),
                    f"{r.gbps:.2f}",
                    f"{r.frac_copy:.3f}",
                    f"{r.spread:.3f}",
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _summary(rows: list[Row]) -> list[str]:
    """The figures the targets speak of, for whatever subset was run."""
    out = []
    fb = [r for r in rows if r.case.group == "resnet50" and r.mode == "train-fwdbwd"]
    if fb:
        worst = min(fb, key=lambda r: r.vs_torch)
        out.append(
            f"- train fwd+bwd, ResNet-50 set ({len(fb)} cases): geomean {_geomean([r.vs_torch for r in fb]):.2f}x "
            f"torch eager ({_verdict(_geomean([r.vs_torch for r in fb]), 2.5)}), lowest {worst.vs_torch:.2f}x "
            f"({worst.case.name}; {_verdict(worst.vs_torch, 1.0)})"
        )
    for mode, target in (("train-fwd", 0.6), ("eval", 0.8)):
        large = [r for r in rows if r.mode == mode and r.case.numel >= LARGE_NUMEL]
        if large:
            fracs = [r.frac_copy for r in large]
            out.append(
                f"- {mode}, large cases ({len(large)}): {statistics_median(fracs):.0%} of copy bandwidth median, "
                f"{min(fracs):.0%}-{max(fracs):.0%} range (target >= {target:.0%}: "
                f"{'met' if statistics_median(fracs) >= target else 'not met'})"
            )
    for mode, what in (("fused-relu", "BN+ReLU"), ("fused-add-relu", "BN+add+ReLU")):
        fused = [r for r in rows if r.case.group == "resnet50" and r.mode == mode]
        if fused:
            worst = min(fused, key=lambda r: r.vs_torch)
            geo = _geomean([r.vs_torch for r in fused])
            target = f" ({_verdict(geo, FUSED_RELU_TARGET)})" if mode == "fused-relu" else ""
            line = (
                f"- {what} fwd+bwd, ResNet-50 set ({len(fused)} cases): geomean "
                f"{_geomean([r.vs_torch for r in fused]):.2f}x torch eager{target}, lowest {worst.vs_torch:.2f}x "
                f"({worst.case.name})"
            )
            with_compile = [r.vs_compile for r in fused if r.vs_compile is not None]
            if with_compile:
                geo_compile = _geomean(with_compile)
                line += f"; {geo_compile:.2f}x torch.compile (target > 1x: {'met' if geo_compile > 1 else 'not met'})"
            out.append(line)
    compiled = [r for r in rows if r.vs_compile is not None]
    if compiled:
        behind = [f"{r.case.name}/{r.mode} {r.vs_compile:.2f}x" for r in compiled if r.vs_compile < 1.0]
        out.append(
            f"- vs torch.compile: ahead in {len(compiled) - len(behind)}/{len(compiled)}, geomean "
            f"{_geomean([r.vs_compile for r in compiled]):.2f}x" + (f"; behind: {', '.join(behind)}" if behind else "")
        )
    small = [r for r in rows if r.case.group == "small"]
    if small:
        worst = max(small, key=lambda r: r.ours_ms / r.torch_ms)
        out.append(
            f"- small shapes: ours/torch time at most {worst.ours_ms / worst.torch_ms:.2f} "
            f"({worst.case.name}/{worst.mode}: {worst.ours_ms * 1e3:.0f} vs {worst.torch_ms * 1e3:.0f} us; "
            f"{_verdict(worst.ours_ms / worst.torch_ms, 2, at_least=False).replace('x:', ':')})"
        )
    return out


def statistics_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def memory_report(quick: bool = False) -> list[str]:
    """Markdown: bytes kept for the backward per fused block, ours vs torch eager, and the saved
    and peak bytes of one training step of the ResNet-style client, ours fused vs torch's layers."""
    import torch
    from torch import nn

    import batchnorm
    from batchnorm.experiments.resnet import TinyResNet
    from batchnorm.memory import peak_bytes, saved_bytes

    shape = (4, 16, 16, 16) if quick else (32, 64, 56, 56)
    c = shape[1]
    conv = nn.Conv2d(c, c, 1, bias=False)
    x0 = torch.randn(shape)
    r = torch.randn(shape, requires_grad=True)
    produce = lambda: conv(x0)  # noqa: E731 - a producer, so the block's input is no leaf kept for free
    base = saved_bytes(produce)
    relu = batchnorm.BatchNorm2d(c, activation="relu")
    leaky = batchnorm.BatchNorm2d(c, activation="leaky_relu", memory_efficient=True)
    bn = nn.BatchNorm2d(c)
    blocks = {
        "BN+ReLU": (lambda: relu(produce()), lambda: torch.relu(bn(produce()))),
        "BN+add+ReLU": (lambda: relu(produce(), r), lambda: torch.relu(bn(produce()) + r)),
        "BN+LeakyReLU, memory_efficient=True": (
            lambda: leaky(produce()),
            lambda: nn.functional.leaky_relu(bn(produce())),
        ),
    }
    lines = [
        f"### Kept for the backward per block, {'x'.join(map(str, shape))} float32 "
        "(MB; the producing conv's own share removed)",
        "",
        "| block | ours | torch eager | ours / torch |",
        "|---|---:|---:|---:|",
    ]
    for name, (ours, theirs) in blocks.items():
        mine, torch_bytes = saved_bytes(ours) - base, saved_bytes(theirs) - base
        lines.append(f"| {name} | {mine / 1e6:.2f} | {torch_bytes / 1e6:.2f} | {mine / torch_bytes:.0%} |")

    batch = (4, 3, 16, 16) if quick else (32, 3, 64, 64)
    inputs = torch.randn(batch)

    def step(model):
        return lambda: model(inputs).sum().backward()

    lines += [
        "",
        f"### ResNet-style client (`experiments.resnet.TinyResNet`, 11 BNs), one training step on "
        f"{'x'.join(map(str, batch))} (MB)",
        "",
        "| client | measure | ours | torch | ours / torch |",
        "|---|---|---:|---:|---:|",
    ]
    clients = {
        "ReLU, `fuse(model)`": (lambda: nn.ReLU(inplace=True), False),
        "LeakyReLU, `fuse(model, memory_efficient=True)`": (lambda: nn.LeakyReLU(0.01, inplace=True), True),
    }
    for name, (activation, memory_efficient) in clients.items():
        reference = TinyResNet(activation=activation)
        fused = batchnorm.fuse(TinyResNet(activation=activation), memory_efficient=memory_efficient)
        fused.load_state_dict(reference.state_dict())
        for what, measure in (("kept for the backward", saved_bytes), ("peak of live tensors", peak_bytes)):
            mine, theirs = measure(step(fused)), measure(step(reference))
            lines.append(f"| {name} | {what} | {mine / 1e6:.2f} | {theirs / 1e6:.2f} | {mine / theirs:.0%} |")
    return lines
