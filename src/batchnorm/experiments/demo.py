"""``batchnorm demo``: train with and without batch normalization and report what changes.

This module only parses options and writes the run folder; it imports torch,
matplotlib and the experiment when the command runs, so that building the CLI
parser stays fast. Every option is checked, and the output folder proven
writable, before any training starts. The run is staged and moved into
``--out`` only once complete, replacing only files an earlier demo run wrote
(``batchnorm.run_folder``): nothing else in the folder is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

__all__ = ["add_arguments", "run"]


def _raise(message: str) -> None:
    raise ValueError(message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.error = _raise  # type: ignore[method-assign]  # one error line (via the CLI), not usage + error
    parser.add_argument("--data", default="digits", metavar="SPEC",
                        help="digits (embedded, default), mnist:DIR, fashion-mnist:DIR or cifar10:DIR")  # fmt: skip
    parser.add_argument("--out", default="batchnorm-demo", metavar="DIR",
                        help="run folder; files of an earlier demo run there are replaced, nothing else is "
                        "touched (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a short run (seconds): fewer steps, rates and seeds")
    parser.add_argument("--steps", type=int, metavar="N", help="MLP training steps per arm")
    parser.add_argument("--lr", type=float, metavar="X", help="MLP learning rate")
    parser.add_argument("--cnn-steps", type=int, metavar="N", help="CNN training steps per arm")
    parser.add_argument("--cnn-lr", type=float, metavar="X", help="CNN learning rate")
    parser.add_argument("--lrs", metavar="LIST", help="learning rates of the sweep, comma-separated")
    parser.add_argument("--seeds", type=int, metavar="N", help="seeds per learning rate in the sweep")
    parser.add_argument("--sweep-steps", type=int, metavar="N", help="training steps of each sweep run")
    parser.add_argument("--init-std", type=float, metavar="X", help="std of the MLP's Gaussian initial weights")
    parser.add_argument("--skip", default="", metavar="PARTS", help="leave out parts: cnn, sweep (comma-separated)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: 1 for digits' tiny networks, else torch's)")  # fmt: skip
    parser.add_argument("--backend", metavar="NAME",
                        help="force a batchnorm backend (torch: no JIT compiling); default: automatic")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace) -> Any:
    from .experiment import Config

    overrides: dict[str, Any] = {"seed": args.seed}
    fields = {"steps": "mlp_steps", "lr": "mlp_lr", "cnn_steps": "cnn_steps", "cnn_lr": "cnn_lr",
              "seeds": "sweep_seeds", "sweep_steps": "sweep_steps", "init_std": "init_std"}  # fmt: skip
    for option, field in fields.items():
        value = getattr(args, option)
        if value is not None:
            overrides[field] = value
    if args.lrs is not None:
        try:
            overrides["sweep_lrs"] = tuple(float(v) for v in args.lrs.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--lrs must be comma-separated numbers, got {args.lrs!r}") from None
    overrides["skip"] = tuple(p.strip() for p in args.skip.split(",") if p.strip())
    cfg = Config.quick(**overrides) if args.quick else Config(**overrides)
    cfg.validate()
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.backend is not None:
        from batchnorm.kernels import get

        get(args.backend)  # unknown or unavailable: fail now
    from batchnorm.run_folder import RunFolder

    from . import report

    folder = RunFolder(args.out, "demo")
    out = folder.out
    started = time.perf_counter()
    folder.check(report.file_names())
    tmp = folder.stage()
    try:
        import torch

        import batchnorm

        from . import datasets

        data = datasets.load(args.data)  # missing / corrupt files fail here, before any training

        from .experiment import run_experiment

        threads = args.threads or (1 if data.name == "digits" else None)
        if threads:
            torch.set_num_threads(threads)
        with batchnorm.backend(args.backend):
            results, recorders = run_experiment(data, cfg, progress=_progress_bars(cfg, args.no_progress))
        results["backend"] = args.backend or "automatic"
        figures = report.write_figures(results, recorders, tmp)
        results["timing_seconds"]["total"] = time.perf_counter() - started
        results["figures"] = figures
        report.write_json(results, tmp / "results.json")
        report.write_html(results, figures, tmp)
        folder.publish()
    except BaseException:
        folder.discard()
        raise
    for line in report.summary_table(results):
        print(line)
    print()
    for line in report.findings(results):
        print(f"* {line}")
    print(f"\nwall time {results['timing_seconds']['total']:.0f} s; report: {out / 'report.html'}")
    return 0


def _progress_bars(cfg: Any, disabled: bool):
    """A factory of tqdm bars on stderr, one per part, each closed when the next begins."""
    if disabled or (not sys.stderr.isatty() and not os.environ.get("BATCHNORM_PROGRESS")):
        return None
    from tqdm import tqdm

    titles = {"mlp": "MLP, both arms", "cnn": "CNN, both arms", "sweep": "LR sweep"}
    work = cfg.work()
    current: list[Any] = []

    def factory(part: str):
        for bar in current:
            bar.close()
        current.clear()
        bar = tqdm(total=work[part], desc=titles[part], unit="step", file=sys.stderr, leave=True, dynamic_ncols=True)
        current.append(bar)

        def update(n: int) -> None:
            bar.update(n)
            if bar.n >= bar.total:
                bar.close()

        return update

    return factory
