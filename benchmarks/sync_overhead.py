"""SyncBatchNorm's per-step overhead against local batch norm, at 2 ranks on the CPU (gloo).

``python benchmarks/sync_overhead.py [--ranks 2] [--rounds 30] [--backend numba|torch]``

Starts the ranks itself (loopback, a free port). Per shape (the per-rank input)
and per round, every rank runs one training forward + backward of our local
``BatchNorm2d``/``BatchNorm1d`` and one of ``SyncBatchNorm``, in alternating
order, each started together after a barrier; a step's time is the slowest
rank's. Also timed: the two collectives alone (``all_gather`` of ``2C + 1``
float64, ``all_reduce`` of ``2C``), which are the floor of the overhead.
Prints a markdown table of the medians with ``sync / local``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import batchnorm

SHAPES = [  # per-rank input: (N, C, H, W) or (N, C); "cl": channels-last
    ((8, 32, 8, 8), False),
    ((32, 64, 28, 28), False),
    ((32, 64, 28, 28), True),
    ((32, 256, 14, 14), False),
    ((16, 64, 56, 56), False),
    ((256, 1024), False),
]


def _step(layer, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Seconds of one forward + backward, the slowest rank's."""
    dist.barrier()
    start = time.perf_counter()
    layer(x).backward(dy)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _collectives(channels: int, world: int) -> float:
    """Seconds of the two collectives alone, the slowest rank's."""
    packed, grads = torch.zeros(2 * channels + 1, dtype=torch.float64), torch.zeros(2 * channels)
    gathered = torch.empty(world * packed.numel(), dtype=torch.float64)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    dist.barrier()
    start = time.perf_counter()
    gather(gathered, packed)
    dist.all_reduce(grads)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _worker(rank: int, world: int, port: int, rounds: int, backend: str | None, queue) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    rows = []
    with batchnorm.backend(backend):
        for shape, channels_last in SHAPES:
            c = shape[1]
            plain_cls = batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d
            local, sync = plain_cls(c), batchnorm.SyncBatchNorm(c)
            x = torch.randn(shape, requires_grad=True)
            if channels_last:
                x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            dy = torch.randn_like(x)
            times: dict[str, list[float]] = {"local": [], "sync": [], "collectives": []}
            for r in range(rounds + 3):  # 3 warm-up rounds
                order = [("local", local), ("sync", sync)][:: 1 if r % 2 else -1]
                measured = {name: _step(layer, x, dy) for name, layer in order}
                measured["collectives"] = _collectives(c, world)
                if r >= 3:
                    for name, seconds in measured.items():
                        times[name].append(seconds)
            label = "x".join(map(str, shape)) + (" cl" if channels_last else "")
            rows.append((label, *(statistics.median(times[k]) * 1e3 for k in ("local", "sync", "collectives"))))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--backend", default=None, help="compute backend (default: automatic)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(
        _worker, args=(args.ranks, port, args.rounds, args.backend, queue), nprocs=args.ranks, start_method="spawn"
    )
    rows = queue.get()
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    print(
        f"SyncBatchNorm vs local BN, forward + backward, {args.ranks} ranks (gloo, loopback), "
        f"{threads} thread(s) per rank, backend {args.backend or 'automatic'}, median of {args.rounds} rounds\n"
    )
    print("| per-rank input | local BN ms | SyncBatchNorm ms | sync / local | overhead ms | collectives alone ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, local, sync, coll in rows:
        print(f"| {label} | {local:.3f} | {sync:.3f} | {sync / local:.2f} | {sync - local:.3f} | {coll:.3f} |")


if __name__ == "__main__":
    main()
