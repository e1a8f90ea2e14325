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
import sys
import time
from typing import Any

__all__ = ["add_arguments", "run"]


def _usage_error(message: str) -> None:
    from batchnorm.usage import UsageError

    raise UsageError(message)


PANELS = """\
what report.html shows (every number also in results.json):
  the story        the argument from the lecture to today, one claim per chapter: the
                   claim, this run's numbers, whether they agree, the figure
  mlp, cnn         training with and without BN: accuracy and loss curves, the
                   percentiles of a last-layer input (the paper's Figure 1), input
                   drift, gradient ICS (Santurkar et al.), one image at a time with
                   batch vs population statistics, the folded multiply-add
  sweep            the learning rates at which each trains (several seeds)
  small-batch      BN, Batch Renorm, ghost batches, precise statistics at batch 2, 4, 8
  shift            shifted test images as trained, after AdaBN, after TENT
  smoothness       the loss and its gradient probed along the gradient during
                   training, with and without BN, over seeds (Santurkar et al. Fig. 4)
  noisy-bn         random per-step shifts and scales after every BN (their Fig. 2)
  population       moving averages at several momenta and precise statistics from N
                   samples against the true statistics (error, accuracy); batch vs
                   population statistics per normalization batch size (Wu & Johnson)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = PANELS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--data", default="digits", metavar="SPEC",
                        help="digits (embedded, default), mnist:DIR, fashion-mnist:DIR or cifar10:DIR")  # fmt: skip
    parser.add_argument("--out", default="batchnorm-demo", metavar="DIR",
                        help="run folder; files of an earlier demo run there are replaced, nothing else is "
                        "touched (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (seconds): fewer steps, rates, seeds and examples")  # fmt: skip
    parser.add_argument("--steps", type=int, metavar="N", help="MLP training steps per arm")
    parser.add_argument("--lr", type=float, metavar="X", help="MLP learning rate")
    parser.add_argument("--cnn-steps", type=int, metavar="N", help="CNN training steps per arm")
    parser.add_argument("--cnn-lr", type=float, metavar="X", help="CNN learning rate")
    parser.add_argument("--lrs", metavar="LIST", help="learning rates of the sweep, comma-separated")
    parser.add_argument("--seeds", type=int, metavar="N", help="seeds per learning rate in the sweep")
    parser.add_argument("--sweep-steps", type=int, metavar="N", help="training steps of each sweep run")
    parser.add_argument("--init-std", type=float, metavar="X", help="std of the MLP's Gaussian initial weights")
    parser.add_argument("--skip", default="", metavar="PARTS",
                        help="leave out parts, comma-separated: cnn, sweep, small-batch, shift, smoothness, "
                        "noisy-bn, population (what each shows: below)")  # fmt: skip
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: 1 for digits' tiny networks, else torch's)")  # fmt: skip
    parser.add_argument("--backend", metavar="NAME",
                        help="force a batchnorm backend (torch: no JIT compiling); default: automatic")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress (default: bars on a terminal, else a line every few seconds)")  # fmt: skip


# option -> the Config field it sets
_FIELDS = {"steps": "mlp_steps", "lr": "mlp_lr", "cnn_steps": "cnn_steps", "cnn_lr": "cnn_lr",
           "seeds": "sweep_seeds", "sweep_steps": "sweep_steps", "init_std": "init_std"}  # fmt: skip
_POSITIVE_INTS = ("steps", "cnn_steps", "seeds", "sweep_steps", "threads")
_POSITIVE_NUMBERS = ("lr", "cnn_lr", "init_std")


def _config(args: argparse.Namespace) -> Any:
    """The experiment's Config from the options; a bad value is a usage error naming its option."""
    import math

    from .experiment import PARTS, Config

    for option in _POSITIVE_INTS:
        value = getattr(args, option)
        if value is not None and value <= 0:
            _usage_error(f"--{option.replace('_', '-')} must be a positive integer, got {value}")
    for option in _POSITIVE_NUMBERS:
        value = getattr(args, option)
        if value is not None and not (math.isfinite(value) and value > 0):
            _usage_error(f"--{option.replace('_', '-')} must be a positive number, got {value}")
    overrides: dict[str, Any] = {"seed": args.seed}
    for option, field in _FIELDS.items():
        value = getattr(args, option)
        if value is not None:
            overrides[field] = value
    if args.lrs is not None:
        try:
            rates = tuple(float(v) for v in args.lrs.split(",") if v.strip())
        except ValueError:
            _usage_error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
        if not rates:
            _usage_error("--lrs: the learning-rate list is empty")
        if not all(math.isfinite(lr) and lr > 0 for lr in rates):
            _usage_error(f"--lrs: learning rates must be positive numbers, got {args.lrs!r}")
        overrides["sweep_lrs"] = rates
    overrides["skip"] = tuple(p.strip() for p in args.skip.split(",") if p.strip())
    unknown = sorted(set(overrides["skip"]) - set(PARTS))
    if unknown:
        _usage_error(f"--skip: cannot skip {unknown}; only {', '.join(PARTS)}")
    cfg = Config.quick(**overrides) if args.quick else Config(**overrides)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from . import datasets

    try:
        datasets.parse_spec(args.data)
    except ValueError as error:
        _usage_error(f"--data: {error}")
    if args.backend is not None:
        from batchnorm.kernels import get

        try:
            get(args.backend)  # unknown or unavailable: fail now
        except (ValueError, RuntimeError) as error:
            _usage_error(f"--backend: {error}")
    from batchnorm.run_folder import RunFolder

    from . import report, story

    folder = RunFolder(args.out, "demo")
    out = folder.out
    started = time.perf_counter()
    folder.check(report.file_names())
    tmp = folder.stage()
    try:
        import torch

        import batchnorm

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
        results["story"] = story.to_json(results)
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
    """A factory of progress reporters on stderr, one per part: tqdm bars on a terminal, else a
    line every few seconds (so a log or CI shows the run is alive); ``None`` with --no-progress."""
    if disabled:
        return None
    titles = {"mlp": "MLP, both arms", "cnn": "CNN, both arms", "sweep": "LR sweep", "small-batch": "small batches",
              "shift": "shift: CNN", "smoothness": "smoothness probes", "noisy-bn": "noisy BN",
              "population": "population statistics"}  # fmt: skip
    work = cfg.work()
    if not sys.stderr.isatty():
        return _progress_lines(titles, work)
    from tqdm import tqdm

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


PROGRESS_EVERY_S = 5.0


def _progress_lines(titles: dict[str, str], work: dict[str, int]):
    def factory(part: str):
        done, started, last = 0, time.perf_counter(), [time.perf_counter()]

        def update(n: int) -> None:
            nonlocal done
            done += n
            now = time.perf_counter()
            if now - last[0] >= PROGRESS_EVERY_S or done >= work[part]:
                last[0] = now
                print(f"{titles[part]}: {done}/{work[part]} steps ({done / work[part]:.0%}), {now - started:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip

        return update

    return factory
