"""Fused batch norm + activation (+ residual add): memory kept for the backward, and time.

Prints two markdown tables:

1. bytes autograd keeps for the backward (distinct storages, counted with
   ``torch.autograd.graph.saved_tensors_hooks``) for BN+ReLU, BN+add+ReLU and
   memory-efficient BN+LeakyReLU, ours vs torch eager; and the same summed
   over one training step of a ResNet-style network (stem + basic and bottleneck
   blocks), ours after ``batchnorm.fuse`` vs torch's layers;
2. forward+backward time of the fused blocks against torch eager (BN, then add,
   then ReLU) and torch.compile of that eager code, with the ratios.

Usage: python benchmarks/fused.py [--shapes 32x64x56x56,32x256x14x14] [--repeats 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' ResNet client
from tests.clients import TinyResNet
from tests.helpers import saved_bytes

DEFAULT_SHAPES = "32x64x56x56,32x256x56x56,32x128x28x28,32x512x14x14"


def _blocks(c: int):
    """name -> (ours(x, r), torch eager(x, r)) for each fused pattern."""
    ours_relu = batchnorm.BatchNorm2d(c, activation="relu")
    ours_leaky = batchnorm.BatchNorm2d(c, activation="leaky_relu", memory_efficient=True)
    theirs = nn.BatchNorm2d(c)
    return {
        "BN+ReLU": (lambda x, r: ours_relu(x), lambda x, r: torch.relu(theirs(x))),
        "BN+add+ReLU": (lambda x, r: ours_relu(x, r), lambda x, r: torch.relu(theirs(x) + r)),
        "BN+LeakyReLU (memory-efficient)": (
            lambda x, r: ours_leaky(x),
            lambda x, r: nn.functional.leaky_relu(theirs(x)),
        ),
    }


def memory_table(shape: tuple[int, ...]) -> list[str]:
    conv = nn.Conv2d(shape[1], shape[1], 1, bias=False)
    x0, r = torch.randn(shape), torch.randn(shape, requires_grad=True)
    produce = lambda: conv(x0)  # noqa: E731 - a producer, so nothing is a leaf the layer could keep for free
    base = saved_bytes(produce)
    lines = [
        f"### Saved for the backward, {'x'.join(map(str, shape))} float32 (MB; the producing conv's own share removed)",
        "",
        "| block | ours | torch eager | ours / torch |",
        "|---|---:|---:|---:|",
    ]
    for name, (ours, theirs) in _blocks(shape[1]).items():
        mine = saved_bytes(lambda ours=ours: ours(produce(), r)) - base
        torch_bytes = saved_bytes(lambda theirs=theirs: theirs(produce(), r)) - base
        lines.append(f"| {name} | {mine / 1e6:.1f} | {torch_bytes / 1e6:.1f} | {mine / torch_bytes:.0%} |")
    reference = TinyResNet()
    fused = batchnorm.fuse(TinyResNet())
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(16, 3, 32, 32)
    step_ours = saved_bytes(lambda: fused(x).sum())
    step_torch = saved_bytes(lambda: reference(x).sum())
    lines += [
        "",
        "| ResNet-style client, one training step (16x3x32x32) | ours (fused) | torch | ours / torch |",
        "|---|---:|---:|---:|",
        f"| activation memory kept for the backward (MB) | {step_ours / 1e6:.1f} | {step_torch / 1e6:.1f} | "
        f"{step_ours / step_torch:.0%} |",
    ]
    return lines


def _time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def time_table(shapes: list[tuple[int, ...]], repeats: int, compile_: bool) -> list[str]:
    lines = [
        "### Forward+backward time (ms, medians), float32",
        "",
        "| block | shape | ours | torch eager | torch.compile | vs eager | vs compile |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ratios_eager: list[float] = []
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        r = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        for name, (ours, theirs) in list(_blocks(shape[1]).items())[:2]:

            def step(f, x=x, r=r, g=g):
                return lambda: torch.autograd.backward(f(x, r), g)

            t_ours, t_eager = _time(step(ours), repeats), _time(step(theirs), repeats)
            t_compile = math.nan
            if compile_:
                torch._dynamo.reset()
                t_compile = _time(step(torch.compile(theirs)), repeats)
            ratios_eager.append(t_eager / t_ours)
            lines.append(
                f"| {name} | {'x'.join(map(str, shape))} | {t_ours:.2f} | {t_eager:.2f} | "
                f"{t_compile:.2f} | {t_eager / t_ours:.2f}x | {t_compile / t_ours:.2f}x |"
            )
    geomean = math.exp(sum(map(math.log, ratios_eager)) / len(ratios_eager))
    lines += ["", f"geometric mean vs torch eager: {geomean:.2f}x"]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(
        f"# fused blocks: {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"backend {batchnorm.kernels.select(torch.empty(shapes[0]).flatten(2)).name} (first shape)\n"
    )
    print("\n".join(memory_table(shapes[0])) + "\n")
    print("\n".join(time_table(shapes, args.repeats, not args.no_compile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
