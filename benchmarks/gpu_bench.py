"""GPU benchmark: ours against torch eager (cuDNN / native) and torch.compile.

Every BatchNorm2d shape of torchvision's ResNet-50 (224x224) at batch 256, in
bfloat16 (float32 parameters, as autocast gives) and float32, NCHW and
channels-last; modes train-fwd, train-fwdbwd (forward + backward) and eval.
"ours" is ``batchnorm.functional.batch_norm`` with running statistics (what a
layer runs); "kernels" is our backend's fused ops alone, for diagnosis.

Each case is first checked against torch eager, then timed with CUDA events
(implementations interleaved, median of blocks). GB/s counts the fewest bytes
a mode must move (train-fwd and eval: read x, write y; backward adds read x
and dy, write dx: 5 tensor passes in all) over our time; "% copy" relates it
to the measured ``dst.copy_(src)`` bandwidth (read + write).

torch.compile costs seconds per case, so it runs after ours and eager, in
order of importance, while ``--budget-s`` lasts; the table is rewritten after
every case so a run cut short still leaves its results.

    python benchmarks/gpu_bench.py --out gpu-results [--budget-s 300]
    python benchmarks/gpu_bench.py --dry-run --out /tmp/x   # tiny CPU run of the harness
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as tF

RESNET50 = [  # (channels, side) of every BatchNorm2d input in ResNet-50 at 224x224
    (64, 112),
    (64, 56), (256, 56),
    (128, 56), (128, 28), (512, 28),
    (256, 28), (256, 14), (1024, 14),
    (512, 14), (512, 7), (2048, 7),
]  # fmt: skip
MODES = ("train-fwd", "train-fwdbwd", "eval")
PASSES = {"train-fwd": 2, "train-fwdbwd": 5, "eval": 2}  # fewest tensor-sized reads + writes
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2}  # relative to the largest value
LARGE = 1 << 26  # elements: "large cases" for the bandwidth target
EPS, MOMENTUM = 1e-5, 0.1


@dataclass
class Case:
    dtype: torch.dtype
    channels_last: bool
    shape: tuple[int, ...]
    mode: str
    ms: dict[str, float] = field(default_factory=dict)
    error: float | None = None
    ok: bool | None = None
    backend: str = "?"

    @property
    def name(self) -> str:
        _, c, h, _ = self.shape
        return f"{str(self.dtype).removeprefix('torch.')}-{'nhwc' if self.channels_last else 'nchw'}-{c}x{h}"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def ratio(self, other: str) -> float | None:
        if "ours" not in self.ms or other not in self.ms:
            return None
        return self.ms[other] / self.ms["ours"]


class Timer:
    """Milliseconds per call: CUDA events around a block of calls, or perf_counter on CPU."""

    def __init__(self, device: torch.device, target_ms: float):
        self.device = device
        self.target_ms = target_ms

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def block(self, step, calls: int) -> float:
        self.sync()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / calls
        began = time.perf_counter()
        for _ in range(calls):
            step()
        return (time.perf_counter() - began) * 1e3 / calls

    def compare(self, steps: dict, blocks: int = 5) -> dict[str, float]:
        """Median ms per call of each step, blocks interleaved across the steps."""
        calls = {}
        for name, step in steps.items():
            step()  # warm-up
            once = max(self.block(step, 1), 1e-3)
            calls[name] = max(3, min(200, int(self.target_ms / once)))
        samples = {name: [] for name in steps}
        for _ in range(blocks):
            for name, step in steps.items():
                samples[name].append(self.block(step, calls[name]))
        return {name: statistics.median(v) for name, v in samples.items()}


def copy_bandwidth(device: torch.device, timer: Timer, numel: int) -> float:
    src = torch.rand(numel, device=device)
    dst = torch.empty_like(src)
    ms = timer.compare({"copy": lambda: dst.copy_(src)})["copy"]
    return 2 * numel * src.element_size() / (ms / 1e3) / 1e9


def _tensors(case: Case, device):
    c = case.shape[1]
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    x = (torch.randn(case.shape, device=device) * 2 + 0.5).to(case.dtype).contiguous(memory_format=fmt)
    dy = torch.randn(case.shape, device=device).to(case.dtype).contiguous(memory_format=fmt)
    params = {
        "weight": torch.rand(c, device=device) + 0.5,  # float32 parameters, as under autocast
        "bias": torch.rand(c, device=device) - 0.5,
        "running_mean": torch.linspace(-1, 1, c, device=device),
        "running_var": torch.linspace(0.5, 2, c, device=device),
    }
    return x, dy, params


def _steps(case: Case, device, with_compile: bool):
    """name -> zero-argument callable running one call of ``case.mode``, and their outputs' getter."""
    import batchnorm.functional as F
    from batchnorm import kernels

    x, dy, base = _tensors(case, device)
    training = case.mode != "eval"
    backward = case.mode == "train-fwdbwd"
    x3 = x.flatten(2)
    case.backend = kernels.select(x3).name
    impls = {
        "ours": lambda x, p: F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                          training, MOMENTUM, EPS),
        "eager": lambda x, p: tF.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                            training, MOMENTUM, EPS),
    }  # fmt: skip
    if with_compile:
        torch._dynamo.reset()  # each shape compiled as in a whole-model graph; no automatic dynamic shapes

        def eager_fn(x, running_mean, running_var, weight, bias):
            return tF.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)

        compiled = torch.compile(eager_fn)
        impls["compile"] = lambda x, p: compiled(x, p["running_mean"], p["running_var"], p["weight"], p["bias"])

    steps, outputs = {}, {}
    for name, fn in impls.items():
        p = {k: v.clone() for k, v in base.items()}
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(backward)
        if backward:
            p["weight"].requires_grad_()
            p["bias"].requires_grad_()

        def step(fn=fn, p=p, xi=xi, name=name):
            if backward:
                xi.grad = p["weight"].grad = p["bias"].grad = None
                y = fn(xi, p)
                y.backward(dy)
                outputs[name] = (y, xi.grad, p["weight"].grad, p["bias"].grad)
            else:
                with torch.no_grad():
                    outputs[name] = (fn(xi, p),)

        steps[name] = step
    if case.mode != "eval" and case.backend != "torch":  # our fused ops alone, without the layer around them
        backend = kernels.select(x3)
        w, b = base["weight"], base["bias"]
        mean = torch.zeros(x.shape[1], device=device)
        invstd = torch.ones(x.shape[1], device=device)
        if backward:
            dy3 = dy.flatten(2)
            steps["kernels"] = lambda: (
                backend.forward_train(x3, w, b, EPS),
                backend.backward_train(dy3, x3, mean, invstd, w),
            )
        else:
            steps["kernels"] = lambda: backend.forward_train(x3, w, b, EPS)
    return steps, outputs


def _check(case: Case, outputs) -> None:
    """Largest difference from torch eager, relative to the largest value, over y (and dx, dweight, dbias)."""
    worst = 0.0
    for got, want in zip(outputs["ours"], outputs["eager"], strict=True):
        want = want.detach().float()
        scale = float(want.abs().max()) or 1.0
        worst = max(worst, float((got.detach().float() - want).abs().max()) / scale)
    if outputs["ours"][0].stride() != outputs["eager"][0].stride():  # the output's memory format
        worst = float("inf")
    case.error = worst
    case.ok = worst <= TOLERANCE[case.dtype]


def run_case(case: Case, device, timer: Timer, with_compile: bool) -> None:
    steps, outputs = _steps(case, device, with_compile)
    if "compile" in steps:  # ours and eager were timed before; only compile now
        steps = {"compile": steps["compile"]}
    else:
        for name in ("ours", "eager"):
            steps[name]()
        _check(case, outputs)
    case.ms.update(timer.compare(steps))
    del steps, outputs


def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def render(cases: list[Case], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| case | shape | mode | backend | ours ms | kernels ms | eager ms | compile ms | vs eager | vs compile "
        "| GB/s | % copy | max rel err |"
    )
    lines.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for c in cases:
        if "ours" not in c.ms:
            continue
        gbps = PASSES[c.mode] * c.numel * c.dtype.itemsize / (c.ms["ours"] / 1e3) / 1e9
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(
            f"| {c.name} | {'x'.join(map(str, c.shape))} | {c.mode} | {c.backend} | {c.ms['ours']:.3f} "
            f"| {fmt(c.ms.get('kernels'), '.3f')} | {c.ms['eager']:.3f} | {fmt(c.ms.get('compile'), '.3f')} "
            f"| {fmt(c.ratio('eager'), '.2f')}x | {fmt(c.ratio('compile'), '.2f')}{'x' if 'compile' in c.ms else ''} "
            f"| {gbps:.0f} | {gbps / COPY_GBPS[0]:.0%} | {c.error:.1e}{'' if c.ok else ' MISMATCH'} |"
        )
    lines += ["", *summary(cases)]
    return "\n".join(lines) + "\n"


def summary(cases: list[Case]) -> list[str]:
    done = [c for c in cases if "ours" in c.ms]
    out = []
    for dtype in sorted({c.dtype for c in done}, key=str):
        fb = [c for c in done if c.dtype == dtype and c.mode == "train-fwdbwd"]
        if fb:
            with_compile = [c.ratio("compile") for c in fb if "compile" in c.ms]
            out.append(
                f"- {dtype} train fwd+bwd ({len(fb)} cases): geomean {_geomean([c.ratio('eager') for c in fb]):.2f}x "
                f"eager (target >= 1.3x); vs compile {_geomean(with_compile):.2f}x over {len(with_compile)} "
                "compiled cases (target >= 1.0x)"
            )
    fb = [c for c in done if c.mode == "train-fwdbwd"]
    if fb:
        out.append(f"- all train fwd+bwd: geomean {_geomean([c.ratio('eager') for c in fb]):.2f}x eager")
    if done:
        worst = min(done, key=lambda c: c.ratio("eager"))
        out.append(f"- lowest vs eager: {worst.ratio('eager'):.2f}x ({worst.name} {worst.mode}; target >= 0.9x)")
    large = [c for c in done if c.mode == "train-fwd" and c.numel >= LARGE]
    if large:
        fr = [PASSES["train-fwd"] * c.numel * c.dtype.itemsize / c.ms["ours"] / 1e6 / COPY_GBPS[0] for c in large]
        out.append(f"- train-fwd, large cases ({len(large)}): {min(fr):.0%}-{max(fr):.0%} of copy (target >= 80%)")
    bad = [f"{c.name}/{c.mode}" for c in done if not c.ok]
    out.append(
        f"- agreement with torch eager: {len(done) - len(bad)}/{len(done)} ok" + (f"; MISMATCH: {bad}" if bad else "")
    )
    out += [f"- FAILED {line}" for line in FAILED]
    skipped = [c for c in done if "compile" not in c.ms]
    if skipped:
        out.append(f"- torch.compile not timed (budget) for {len(skipped)} cases")
    return out


COPY_GBPS = [float("nan")]
FAILED: list[str] = []  # cases that raised, with the error


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-results", help="folder for gpu_bench.md and gpu_bench.csv")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--budget-s", type=float, default=360.0, help="stop starting new work after this long")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--target-ms", type=float, default=20.0, help="length of one timed block")
    ap.add_argument("--dry-run", action="store_true", help="CPU, batch 2, sides / 8, three shapes: tests the harness")
    args = ap.parse_args(argv)
    began = time.monotonic()
    deadline = began + args.budget_s

    if args.dry_run:
        device, shapes = torch.device("cpu"), [(c, max(1, s // 8)) for c, s in RESNET50[::5]]
        batch = 2 if args.batch == 256 else args.batch
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device (use --dry-run to test the harness on CPU)", file=sys.stderr)
            return 2
        device, shapes, batch = torch.device("cuda"), RESNET50, args.batch
        torch.backends.cudnn.benchmark = True
    timer = Timer(device, args.target_ms if not args.dry_run else 2.0)
    COPY_GBPS[0] = copy_bandwidth(device, timer, (1 << 28) if device.type == "cuda" else (1 << 20))

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (
        f"# batchnorm GPU bench: {card}; torch {torch.__version__}, triton {triton_version}, "
        f"cuDNN {torch.backends.cudnn.version()}; batch {batch}\n"
        f"copy bandwidth {COPY_GBPS[0]:.0f} GB/s (dst.copy_(src), read + write); medians of CUDA-event blocks"
    )
    print(header, flush=True)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    cases = [
        Case(dtype, cl, (batch, c, s, s), mode)
        for mode in modes
        for dtype in dtypes
        for cl in (False, True)
        for c, s in shapes
    ]
    os.makedirs(args.out, exist_ok=True)
    md, csv = os.path.join(args.out, "gpu_bench.md"), os.path.join(args.out, "gpu_bench.csv")

    def save():
        with open(md, "w") as f:
            f.write(render(cases, header))
        with open(csv, "w") as f:
            f.write("case,dtype,layout,shape,mode,backend,ours_ms,kernels_ms,eager_ms,compile_ms,max_rel_err,ok\n")
            for c in cases:
                if "ours" in c.ms:
                    f.write(
                        f"{c.name},{c.dtype},{'nhwc' if c.channels_last else 'nchw'},{'x'.join(map(str, c.shape))},"
                        f"{c.mode},{c.backend},{c.ms['ours']:.4f},{c.ms.get('kernels', '')},{c.ms['eager']:.4f},"
                        f"{c.ms.get('compile', '')},{c.error:.3e},{c.ok}\n"
                    )

    # phase 1: ours and eager, every case (fwd+bwd first: the headline target)
    order = sorted(cases, key=lambda c: MODES.index(c.mode) != 1)
    for case in order:
        if time.monotonic() > deadline:
            print("budget spent; remaining cases left out", flush=True)
            break
        try:
            run_case(case, device, timer, with_compile=False)
        except Exception as error:  # one broken case must not hide the others
            FAILED.append(f"{case.name} {case.mode}: {type(error).__name__}: {str(error).strip()[:300]}")
            print(FAILED[-1], flush=True)
            case.ms.clear()
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"{case.name} {case.mode}: ours {case.ms['ours']:.3f} ms, eager {case.ms['eager']:.3f} ms, "
              f"err {case.error:.1e}", flush=True)  # fmt: skip
        save()
    # phase 2: torch.compile while the budget lasts, fwd+bwd first, bfloat16 before float32
    if not args.no_compile:
        last_cost = 0.0
        for case in sorted(
            [c for c in order if "ours" in c.ms],
            key=lambda c: (MODES.index(c.mode) != 1, str(c.dtype) != "torch.bfloat16"),
        ):
            if time.monotonic() + 1.5 * last_cost > deadline:
                print("budget spent; torch.compile left out for the remaining cases", flush=True)
                break
            started = time.monotonic()
            try:
                run_case(case, device, timer, with_compile=True)
            except Exception as error:  # a compile failure is a result, not a crash
                print(f"{case.name} {case.mode}: torch.compile failed: {error}", flush=True)
            last_cost = time.monotonic() - started
            print(f"{case.name} {case.mode}: compile {case.ms.get('compile', float('nan')):.3f} ms "
                  f"({last_cost:.0f} s)", flush=True)  # fmt: skip
            save()
    save()
    print("", *summary(cases), f"wrote {md} ({time.monotonic() - began:.0f} s)", sep="\n")
    return 0 if all(c.ok for c in cases if c.ok is not None) and not FAILED else 1


if __name__ == "__main__":
    sys.exit(main())
