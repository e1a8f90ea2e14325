"""``batchnorm bench``: our layers against torch eager and torch.compile, side by side, on CPU or GPU.

The cases are the shared table of :mod:`batchnorm.cases` (ResNet-50's batch-norm
layers at batch 32, or 256 with ``--device cuda``; MLP and small shapes). For
each case and mode it checks our results against torch eager (and against
``batchnorm.reference`` for plain layers up to 4M elements), then times the
three implementations interleaved (one round of each in turn, so a noisy
machine slows all of them alike) and reports medians.

Modes: ``train-fwd``, ``train-fwdbwd`` and ``eval`` time the plain layer;
``fused-relu``, ``fused-elu``, ``fused-silu`` and ``fused-add-relu`` time
forward+backward of the fused blocks ``act(BN(x))`` and ``relu(BN(x) + r)``: our
layer with that ``activation`` against torch's BN, add and activation as separate
modules (eager, and compiled). With
the fused modes selected, a memory report follows the table (CPU): bytes kept
for the backward per block, and the saved and peak bytes of a training step of
the ResNet-style client (``experiments.resnet``), ours after ``batchnorm.fuse``
against torch's layers (``batchnorm.memory``).

Bandwidth napkin math, the fewest bytes each mode must move (element size s,
n elements): train forward reads x and writes y (2ns); the backward reads x and
dy and writes dx (3ns), so train forward+backward is 5ns; eval reads x and
writes y (2ns); ``fused-relu`` (and ELU, SiLU) moves what train forward+backward
does (5ns), ``fused-add-relu`` also reads r and writes its gradient (7ns). The C-sized
parameters, statistics and the 1-bit sign mask are ignored. "GB/s" is
that byte count over our median time, "% copy" its fraction of the machine's
copy bandwidth (``dst.copy_(src)`` into an existing 256 MiB buffer, 1 GiB on a
GPU, counted as read + write), measured at start. A freshly allocated output
costs page faults on top of that (shown as the "fresh-copy" figure: ``src.clone()``).

On a GPU (``--device cuda``) a round is a block of calls lasting about
``--target-ms``, timed with CUDA events; ``--dtype bfloat16`` or ``float16``
keeps the parameters in float32, as autocast gives (on any device). Options for
a run with a deadline, such as ``benchmarks/gpu_check.sh``: ``--budget-s``
stops starting new work once spent and moves torch.compile (seconds per case)
to a second pass, after every case has ours and torch, forward+backward first;
``--keep-going`` reports a failing case and goes on (exit status 1 at the end);
``--kernels`` adds our backend's kernels alone, without the layer around them.
With ``--out`` the table is rewritten after every case, so a run cut short
still leaves its results. ``--dry-run`` runs the selected cases shrunk
(``cases.shrink``) on the CPU, whatever ``--device`` says: a test of the harness.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from .cases import MODELS, OWN_MODELS, QUICK, Case, shrink
from .cases import cases as case_table
from .usage import UsageError

PLAIN_MODES = ("train-fwd", "train-fwdbwd", "eval")
FUSED_ACTIVATION = {"fused-relu": "relu", "fused-elu": "elu", "fused-silu": "silu", "fused-add-relu": "relu"}
FUSED_MODES = tuple(FUSED_ACTIVATION)
FUSED_NAMES = {"fused-relu": "BN+ReLU", "fused-elu": "BN+ELU", "fused-silu": "BN+SiLU", "fused-add-relu": "BN+add+ReLU"}
MODES = PLAIN_MODES + FUSED_MODES
MODEL_MODES = ("model-train", "model-eval")  # whole models (batchnorm.model_bench), asked for by name
SEMANTICS_MODES = ("ghost", "masked")  # ghost batches and masks (batchnorm.semantics_bench), asked for by name
NAMED_MODES = MODEL_MODES + SEMANTICS_MODES
BYTES_PER_ELEMENT_MOVED = {  # in units of n * itemsize
    "train-fwd": 2,
    "train-fwdbwd": 5,
    "eval": 2,
    "fused-relu": 5,
    "fused-elu": 5,
    "fused-silu": 5,
    "fused-add-relu": 7,
}
DTYPES = ("float32", "float64", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")  # parameters stay float32, as autocast gives
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 4e-2, "float16": 1e-2}  # against torch eager
REFERENCE_MAX_NUMEL = 1 << 22
NOISY_SPREAD = 1.2  # rounds of one timing that differ by more than this: the machine is busy


@dataclass(frozen=True)
class Targets:
    """What the closing lines measure the results against, per device; where one is not met,
    benchmarks/README.md ("Targets") keeps what was measured about why."""

    fwdbwd: float  # train fwd+bwd on the ResNet-50 set: geomean vs torch eager
    fwdbwd_lowest: float  # ... and its lowest case
    copy: dict[str, float]  # mode -> fraction of the copy bandwidth on the large cases
    large_numel: int  # "large cases": this many elements and up (larger than the last-level cache)
    fused: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # mode -> geomean, lowest
    fwdbwd_compile: float | None = None  # train fwd+bwd on the ResNet-50 set: geomean vs torch.compile
    fwdbwd_channels_last: float | None = None  # ... geomean of the channels-last cases alone
    layouts_within: float | None = None  # train fwd+bwd, large cases: NCHW and channels-last % copy this close
    small: float | None = None  # small shapes: our time / torch's, at most


TARGETS = {
    "cpu": Targets(  # 8M elements: 32 MiB of float32
        2.5, 1.0, {"train-fwd": 0.6, "train-fwdbwd": 0.75, "eval": 0.8}, 1 << 23,
        fused={"fused-relu": (3.0, 1.2), "fused-add-relu": (3.0, 1.2), "fused-elu": (2.0, None),
               "fused-silu": (2.0, None)},
        fwdbwd_channels_last=1.5, layouts_within=0.1, small=1.2,
    ),
    "cuda": Targets(1.3, 0.9, {"train-fwd": 0.8}, 1 << 26, fwdbwd_compile=1.0),
}  # fmt: skip
WHY_NOT = " (why: benchmarks/README.md, Targets)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="input dtype (default float32); bfloat16 and float16 keep float32 parameters")  # fmt: skip
    parser.add_argument("--cases", default="", help="comma-separated substrings; run only cases whose name has one")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated subset of {','.join(MODES)} (the default), the whole-model modes "
                        f"{','.join(MODEL_MODES)}, the batch-semantics modes {','.join(SEMANTICS_MODES)}")  # fmt: skip
    parser.add_argument("--batch", type=int, default=None,
                        help="batch of the ResNet-50 cases (default 32, cuda 256) and models (default 16)")  # fmt: skip
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"model modes: comma-separated subset of {','.join(MODELS)} (torchvision's; the "
                        f"default) and {','.join(OWN_MODELS)} (ResNet-style, without torchvision)")  # fmt: skip
    parser.add_argument("--image-size", type=int, default=112, help="model modes: input height and width (default 112)")
    parser.add_argument("--quick", action="store_true", help="a few small cases, few repeats: seconds, for tests")
    parser.add_argument("--dry-run", action="store_true",
                        help="the selected cases shrunk to at most 50K elements, on the CPU whatever --device says: "
                        "tests the harness")  # fmt: skip
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per case (default 7, quick 3, dry run 1)")  # fmt: skip
    parser.add_argument("--target-ms", type=float, default=20.0,
                        help="cuda: length of one timed round, a block of calls (default 20)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new work after this many seconds; torch.compile is then timed in a second "
                        "pass, train-fwdbwd first, after every case has ours and torch")  # fmt: skip
    parser.add_argument("--keep-going", action="store_true",
                        help="list a case that fails or disagrees and go on (exit status 1)")  # fmt: skip
    parser.add_argument("--kernels", action="store_true",
                        help="also time our backend's kernels alone (train modes), and name the backend")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for results.md and results.csv, rewritten after every case (files of an "
                        "earlier bench run there are replaced, nothing else is touched)")  # fmt: skip
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
    kernels_ms: float | None = None  # --kernels: our backend's kernels alone
    backend: str = ""  # --kernels: the backend our layer ran

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
    for option in ("repeats", "threads", "batch", "target_ms", "budget_s", "image_size"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            kind = "integer" if option in ("repeats", "threads", "batch", "image_size") else "number"
            raise UsageError(f"--{option.replace('_', '-')} must be a positive {kind}, got {value}")
    device = args.device.split(":")[0]
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {args.device!r}")
    if device == "cuda" and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here "
                             "(--dry-run runs the same cases shrunk, on the CPU)")  # fmt: skip
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES + NAMED_MODES:
            raise UsageError(f"--modes: unknown mode {mode!r}; expected some of {', '.join(MODES + NAMED_MODES)}")
    if any(m in NAMED_MODES for m in modes) and device == "cuda" and not args.dry_run:
        raise UsageError(f"--modes {','.join(m for m in modes if m in NAMED_MODES)}: CPU only for now")
    if any(m in MODEL_MODES for m in modes):
        parse_models(args.models)
    if not any(m in MODES for m in modes):
        return modes, []
    cases = _select_cases(args)
    if not cases:
        raise UsageError(f"--cases: no case matches {args.cases!r}")
    return modes, cases


def run(args: argparse.Namespace) -> int:
    import time

    modes, cases = _checked(args)
    import torch

    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    small = args.quick or args.dry_run
    repeats = args.repeats or (1 if args.dry_run else 3 if args.quick else 7)
    folder = None
    if args.out:  # files of an earlier bench run there are replaced, nothing else
        from .run_folder import RunFolder

        folder = RunFolder(args.out, "bench")
        folder.check(["results.md", "results.csv"])

    copy_gbps, fresh_gbps = _copy_bandwidth(device, quick=small)
    layer_modes = [m for m in modes if m in MODES]
    model_modes = [m for m in modes if m in MODEL_MODES]
    top = [_header(args, device, dtype, repeats, copy_gbps, fresh_gbps)]
    if layer_modes:
        top += ["", LEGEND, "", _markdown_header(args.kernels)]
    print(*top, sep="\n", flush=True)

    jobs = [(case, mode) for case in cases for mode in layer_modes]
    budget = args.budget_s
    if budget is not None:  # the headline mode first, in case the budget runs out
        jobs.sort(key=lambda job: job[1] != "train-fwdbwd")
    compile_later = budget is not None and not args.no_compile
    done: dict[tuple[str, str], Row] = {}
    failed: list[str] = []  # ours failed or disagreed: exit status 1
    compile_failed: list[str] = []  # torch.compile failed: a result, not a failure of ours
    left_out = {"rows": 0, "compile": 0}
    progress = f"{len(jobs)} rows"
    started = time.perf_counter()

    def rows() -> list[Row]:  # in the table's order, whatever order they ran in
        return [done[c.name, m] for c in cases for m in modes if (c.name, m) in done]

    def closing() -> list[str]:
        return [
            *_summary(rows(), TARGETS[device.type]),
            *_noise_note(rows(), repeats),
            *([f"- budget spent: {left_out['rows']} of {len(jobs)} rows not run"] if left_out["rows"] else []),
            *([f"- torch.compile not timed (budget) in {left_out['compile']} rows"] if left_out["compile"] else []),
            *[f"- FAILED {line}" for line in failed],
            *[f"- torch.compile failed: {line}" for line in compile_failed],
        ]

    def table(end: list[str]) -> list[str]:
        return [*top, *(_markdown_row(r, args.kernels) for r in rows()), "", *end]

    def measure(case: Case, mode: str, with_compile: bool) -> None:
        try:
            row = _bench_one(case, mode, device, dtype, repeats, with_compile, copy_gbps, args.kernels, args.target_ms)
        except Exception as error:  # with --keep-going one broken case does not hide the others
            if not args.keep_going:
                raise
            message = (str(error).strip().splitlines() or [""])[0][:300]
            compile_only = compile_later and with_compile  # ours passed in the first pass
            listed = compile_failed if compile_only else failed
            listed.append(f"{case.name}/{mode}: {type(error).__name__}: {message}")
            print(f"- {'torch.compile failed:' if compile_only else 'FAILED'} {listed[-1]}", flush=True)
            return
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done[case.name, mode] = row
        print(_markdown_row(row, args.kernels), flush=True)
        if folder is not None:  # a run cut short still leaves what it measured
            _write(folder, table([*closing(), f"- run in progress: {len(done)} of {progress}"]), rows(), args.kernels)

    def spent(cost: float = 0.0) -> bool:
        return budget is not None and time.perf_counter() - started + cost > budget

    for k, (case, mode) in enumerate(jobs):
        if spent():
            left_out["rows"] = len(jobs) - k
            print(f"budget spent: {left_out['rows']} of {len(jobs)} rows left out", flush=True)
            break
        measure(case, mode, with_compile=not args.no_compile and not compile_later)
    if compile_later:  # a second pass, with torch.compile, while the budget lasts
        print("", "again with torch.compile, while the budget lasts:", sep="\n", flush=True)
        ready = [(case, mode) for case, mode in jobs if (case.name, mode) in done]
        progress = f"{len(jobs)} rows; torch.compile pass"
        last_cost = 0.0
        for k, (case, mode) in enumerate(ready):
            if spent(1.5 * last_cost):
                left_out["compile"] = len(ready) - k
                print(f"budget spent: torch.compile left out in {left_out['compile']} rows", flush=True)
                break
            began = time.perf_counter()
            measure(case, mode, with_compile=True)
            last_cost = time.perf_counter() - began

    if model_modes:  # whole models, after the layers
        from . import model_bench

        print("", flush=True)
        size = 32 if small else args.image_size
        batch = args.batch or (2 if small else 16)
        models = model_bench.report(parse_models(args.models), model_modes, batch, size, repeats,
                                    lambda line: print(line, flush=True))  # fmt: skip
        top += ["", *models]
    semantics_modes = [m for m in modes if m in SEMANTICS_MODES]
    if semantics_modes:  # ghost batches and masks, after the layers
        from . import semantics_bench

        print("", flush=True)
        top += ["", *semantics_bench.report(semantics_modes, repeats, small, not args.no_compile,
                                            lambda line: print(line, flush=True))]  # fmt: skip
    summary = closing()
    memory: list[str] = []
    if not args.no_memory and any(m in FUSED_MODES for m in modes) and device.type == "cpu":
        memory = ["", *memory_report(quick=small)]
    print("", *summary, f"({time.perf_counter() - started:.0f} s)", *memory, sep="\n")
    if folder is not None:
        _write(folder, table([*summary, *memory]), rows(), args.kernels)
        print(f"wrote {folder.out / 'results.md'} and results.csv")
    return 1 if failed else 0


def _write(folder, table: list[str], rows: list[Row], kernels: bool) -> None:
    """results.md and results.csv into ``folder`` (a RunFolder), replacing the earlier ones."""
    staged = folder.stage()
    try:
        (staged / "results.md").write_text("\n".join(table) + "\n")
        (staged / "results.csv").write_text(_csv(rows, kernels))
        folder.publish()
    except BaseException:
        folder.discard()
        raise


def _header(args, device, dtype, repeats: int, copy_gbps: float, fresh_gbps: float) -> str:
    import os
    import platform

    import torch

    import batchnorm

    # the backend of a layer above the small-input rule (small ones run torch's kernel on the CPU)
    chosen = batchnorm.kernels.select(torch.empty(1, 8, 1 << 16, device=device, dtype=dtype)).name
    if device.type == "cuda":
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "absent"
        machine = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, "
                   f"cuDNN {torch.backends.cudnn.version()}, triton {triton_version}")  # fmt: skip
        rounds = f"rounds of about {args.target_ms:g} ms of calls, timed with CUDA events"
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        rounds = "rounds"
    params = " (float32 parameters)" if args.dtype in HALF_DTYPES else ""
    dry = "; dry run: the cases shrunk, on the CPU" if args.dry_run else ""
    return (
        f"# batchnorm bench: {machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}, {args.dtype}{params}, backend {chosen!r}\n"
        f"copy bandwidth {copy_gbps:.1f} GB/s (into an existing buffer), "
        f"{fresh_gbps:.1f} GB/s (fresh output, page faults included); medians of {repeats} {rounds}{dry}"
    )


def parse_models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UsageError("--models: no model named")
    for name in names:
        if name not in MODELS + OWN_MODELS:
            raise UsageError(f"--models: unknown model {name!r}; expected some of {', '.join(MODELS + OWN_MODELS)}")
    return names


def _select_cases(args) -> list[Case]:
    batch = args.batch or (256 if args.device.startswith("cuda") else 32)
    table = case_table(batch=batch)
    if args.quick and not args.cases:
        table = [c for c in table if c.name in QUICK]
    else:
        wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
        table = [c for c in table if not wanted or any(w in c.name for w in wanted)]
    return [shrink(c) for c in table] if args.dry_run else table


def _time_block(fn, device, calls: int = 1) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls in a row: CUDA events on a GPU, else the wall clock."""
    import time

    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls


def _calls_per_round(fn, device, target_ms: float) -> int:
    """One call a round on a CPU; on a GPU as many as take about ``target_ms`` (3 to 200)."""
    if device.type != "cuda":
        return 1
    once = max(_time_block(fn, device) * 1e3, 1e-3)
    return max(3, min(200, int(target_ms / once)))


def _copy_bandwidth(device, quick: bool) -> tuple[float, float]:
    """Read + write GB/s of a 256 MiB copy (1 GiB on a GPU, 16 MiB with --quick): into a buffer, and into a
    fresh one."""
    import statistics

    import torch

    n = (1 << 22) if quick else (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    into, fresh = [], []
    for _ in range(3 if quick else 7):
        into.append(_time_block(lambda: dst.copy_(src), device))
        fresh.append(_time_block(src.clone, device))
    nbytes = 2 * n * src.element_size()
    return nbytes / statistics.median(into) / 1e9, nbytes / statistics.median(fresh) / 1e9


def _eager_block():
    """torch's way of writing ``act(BN(x) [+ r])``: separate modules, as in torchvision."""
    import torch

    class EagerBlock(torch.nn.Module):
        def __init__(self, bn: torch.nn.Module, act: torch.nn.Module):
            super().__init__()
            self.bn = bn
            self.act = act

        def forward(self, x, r=None):
            y = self.bn(x)
            if r is not None:
                y = y + r
            return self.act(y)

    return EagerBlock


def _layers(case: Case, device, dtype, mode: str = "train-fwd"):
    """(ours, torch) layers with the same parameters (float32 for half inputs), in train mode; for
    a fused mode, our layer with its ``activation`` and torch's BN + activation modules."""
    import torch

    import batchnorm

    c = case.shape[1]
    kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(case.shape)]
    extra = {"activation": FUSED_ACTIVATION[mode]} if mode in FUSED_MODES else {}
    if dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32  # the parameters, as autocast leaves them
    ours = getattr(batchnorm, kind)(c, device=device, dtype=dtype, **extra)
    theirs = getattr(torch.nn, kind)(c, device=device, dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
        theirs.load_state_dict(ours.state_dict())
    if mode in FUSED_MODES:
        from .activations import KINDS

        theirs = _eager_block()(theirs, KINDS[FUSED_ACTIVATION[mode]].module())
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


def _bench_one(
    case: Case,
    mode: str,
    device,
    dtype,
    repeats: int,
    with_compile: bool,
    copy_gbps: float,
    kernels: bool = False,
    target_ms: float = 20.0,
) -> Row:
    import statistics

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
        steps = {name: (lambda layer=layer: _step(layer, x, dy, mode, r)) for name, layer in impls.items()}
        backend = ""
        if kernels:
            backend, step = _kernel_step(x, dy, ours, mode)
            if step is not None:
                steps["kernels"] = step
        for step in steps.values():  # a second warm-up: compiled backward, caches; the kernels' first
            step()
        calls = {name: _calls_per_round(step, device, target_ms) for name, step in steps.items()}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                times[name].append(_time_block(step, device, calls[name]))
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    nbytes = BYTES_PER_ELEMENT_MOVED[mode] * case.numel * x.element_size()
    gbps = nbytes / (ms["ours"] / 1e3) / 1e9
    spread = max(max(t) / min(t) for t in times.values())  # slowest over fastest round, worst implementation
    return Row(case, mode, ms["ours"], ms["torch"], ms.get("compile"), gbps, gbps / copy_gbps, spread,
               ms.get("kernels"), backend)  # fmt: skip


def _kernel_step(x, dy, ours, mode: str):
    """(name of the backend our layer runs, a call of its forward (and backward) kernels alone, without
    the layer, autograd and running statistics around them; None for the modes it does not cover)."""
    import torch

    from batchnorm import kernels

    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1)  # the (N, C, L) view, no copy
    backend = kernels.select(x3, fused=mode in FUSED_MODES)
    if mode not in ("train-fwd", "train-fwdbwd"):
        return backend.name, None
    w, b = ours.weight.detach(), ours.bias.detach()
    if mode == "train-fwd":
        return backend.name, lambda: backend.forward_train(x3, w, b, ours.eps)
    dy3 = dy.reshape(x3.shape)
    mean, invstd = torch.zeros_like(w), torch.ones_like(w)  # values do not change the time
    return backend.name, lambda: (backend.forward_train(x3, w, b, ours.eps),
                                  backend.backward_train(dy3, x3, mean, invstd, w))  # fmt: skip


def _validate(case: Case, mode: str, results, x, dy, ours) -> None:
    """Ours against torch eager (every case) and the float64 reference (small cases)."""
    import numpy as np
    import torch

    from batchnorm import reference

    names = ["y", "dx", "dweight", "dbias", "dresidual"]
    expected = results["torch"]
    if FUSED_ACTIVATION.get(mode) == "relu":
        # Where the pre-activation is within rounding of 0, the two implementations may take the
        # ReLU's kink on different sides, and with few values per channel one such element moves
        # every gradient of its channel. So the gradients are checked against torch's batch norm
        # (eager) differentiated with ReLU's derivative taken where our forward let z through; the
        # outputs, against torch's, agree anyway (at the kink both are within rounding of 0).
        expected = _torch_with_our_relu_mask(results, x, dy, mode)
    for name, got, want in zip(names, results["ours"], expected, strict=False):
        got, want = got.detach(), want.detach()
        scale = float(want.abs().max()) if want.numel() else 1.0
        tol = TOLERANCE[str(x.dtype).removeprefix("torch.")]
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
        tol = TOLERANCE[str(x.dtype).removeprefix("torch.")] * max(1.0, float(np.abs(want).max()))
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


def _verdict(value: float, target: float, at_least: bool = True, unit: str = "x") -> str:
    met = value >= target if at_least else value <= target
    shown = f"{target:.0%}" if unit == "%" else f"{target:g}{unit}"
    return f"target {'>=' if at_least else '<='} {shown}: {'met' if met else 'not met' + WHY_NOT}"


def _markdown_header(kernels: bool = False) -> str:
    return (
        "| case | shape | mode | ours ms | torch ms | compile ms | vs torch | vs compile | GB/s | % copy |"
        + (" backend | kernels ms |" if kernels else "")
        + "\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
        + ("---|---:|" if kernels else "")
    )


def _markdown_row(r: Row, kernels: bool = False) -> str:
    shape = "x".join(map(str, r.case.shape))
    mark = "~" if r.noisy else ""
    return (
        f"| {r.case.name} | {shape} | {r.mode} | {r.ours_ms:.3f} | {r.torch_ms:.3f} | {_fmt(r.compile_ms, '.3f')} "
        f"| {r.vs_torch:.2f}x{mark} | {_fmt(r.vs_compile, '.2f')}{'x' if r.vs_compile else ''}"
        f"{mark if r.vs_compile else ''} | {r.gbps:.1f} | {r.frac_copy:.0%} |"
        + (f" {r.backend} | {_fmt(r.kernels_ms, '.3f')} |" if kernels else "")
    )


def _csv(rows: list[Row], kernels: bool = False) -> str:
    lines = ["case,group,shape,channels_last,mode,ours_ms,torch_ms,compile_ms,vs_torch,vs_compile,gbps,frac_copy,"
             "spread" + (",backend,kernels_ms" if kernels else "")]  # fmt: skip
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
                    *([r.backend, _fmt(r.kernels_ms, ".4f").replace("-", "")] if kernels else []),
                ]
            )
        )
    return "\n".join(lines) + "\n"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _summary(rows: list[Row], targets: Targets = TARGETS["cpu"]) -> list[str]:
    """The figures the targets speak of, for whatever subset was run, each with its verdict."""
    out = []
    fb = [r for r in rows if r.case.group == "resnet50" and r.mode == "train-fwdbwd"]
    if fb:
        worst = min(fb, key=lambda r: r.vs_torch)
        geo = _geomean([r.vs_torch for r in fb])
        line = (
            f"- train fwd+bwd, ResNet-50 set ({len(fb)} cases): geomean {geo:.2f}x torch eager "
            f"({_verdict(geo, targets.fwdbwd)}), lowest {worst.vs_torch:.2f}x ({worst.case.name}; "
            f"{_verdict(worst.vs_torch, targets.fwdbwd_lowest)})"
        )
        with_compile = [r.vs_compile for r in fb if r.vs_compile is not None]
        if targets.fwdbwd_compile is not None and with_compile:
            geo = _geomean(with_compile)
            line += f"; {geo:.2f}x torch.compile in {len(with_compile)} ({_verdict(geo, targets.fwdbwd_compile)})"
        out.append(line)
        last = [r.vs_torch for r in fb if r.case.channels_last]
        if targets.fwdbwd_channels_last is not None and last:
            geo = _geomean(last)
            out.append(f"- train fwd+bwd, channels-last alone ({len(last)} cases): geomean {geo:.2f}x torch eager "
                       f"({_verdict(geo, targets.fwdbwd_channels_last)})")  # fmt: skip
    for mode, target in targets.copy.items():
        large = [r for r in rows if r.mode == mode and r.case.numel >= targets.large_numel]
        if large:
            fracs = [r.frac_copy for r in large]
            median = statistics_median(fracs)
            out.append(
                f"- {mode}, large cases ({len(large)}): {median:.0%} of copy bandwidth median, "
                f"{min(fracs):.0%}-{max(fracs):.0%} range ({_verdict(median, target, unit='%')})"
            )
        if mode == "train-fwdbwd" and targets.layouts_within is not None:
            by_layout = [[r.frac_copy for r in large if r.case.channels_last == last] for last in (False, True)]
            if all(by_layout):
                nchw, last = (statistics_median(fracs) for fracs in by_layout)
                gap = 1 - min(nchw, last) / max(nchw, last)
                out.append(
                    f"- train-fwdbwd, large cases: NCHW {nchw:.0%}, channels-last {last:.0%} of copy bandwidth, "
                    f"{gap:.0%} apart ({_verdict(gap, targets.layouts_within, at_least=False, unit='%')})"
                )
    for mode, what in FUSED_NAMES.items():
        fused = [r for r in rows if r.case.group == "resnet50" and r.mode == mode]
        if not fused:
            continue
        worst = min(fused, key=lambda r: r.vs_torch)
        geo = _geomean([r.vs_torch for r in fused])
        goal, lowest = targets.fused.get(mode, (None, None))
        line = (
            f"- {what} fwd+bwd, ResNet-50 set ({len(fused)} cases): geomean {geo:.2f}x torch eager"
            + (f" ({_verdict(geo, goal)})" if goal is not None else "")
            + f", lowest {worst.vs_torch:.2f}x ({worst.case.name}"
            + (f"; {_verdict(worst.vs_torch, lowest)})" if lowest is not None else ")")
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
        ratio = worst.ours_ms / worst.torch_ms
        extra = max((r.ours_ms - r.torch_ms) * 1e3 for r in small)
        out.append(
            f"- small shapes: ours/torch time at most {ratio:.2f} ({worst.case.name}/{worst.mode}: "
            f"{worst.ours_ms * 1e3:.0f} vs {worst.torch_ms * 1e3:.0f} us; at most {extra:.0f} us per call over "
            f"torch's" + (f"; {_verdict(ratio, targets.small, at_least=False, unit='')}" if targets.small else "") + ")"
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
