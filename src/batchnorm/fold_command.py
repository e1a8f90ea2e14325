"""``batchnorm fold MODEL.pt2 -o OUT.pt2``: fold the batch norms of a saved ``torch.export`` program.

Loads the program, folds each eval-mode batch norm into the conv/linear op before it
(:mod:`batchnorm.fold_program`), checks that the folded program computes what the original
does on the program's example inputs (or random inputs of the shapes ``--input-shape`` gives),
prints what was folded or left and why, and the eval time of both (medians of ``--repeats``
interleaved runs), and saves the result with ``torch.export.save``. Nothing is written when
parity fails; an existing output is replaced only with ``--force``, and then only once the new
program is complete (written next to it and moved into place).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from .fold_program import example_inputs_of, fold_program, has_batch_norm, max_error
from .usage import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.pt2", help="a program saved with torch.export.save")
    parser.add_argument("-o", "--output", metavar="OUT.pt2", required=True, help="where to save the folded program")
    parser.add_argument("--force", action="store_true", help="replace OUT.pt2 if it exists")
    parser.add_argument("--repeats", type=int, default=20, metavar="N", help="timed runs of each program (default 20)")
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="D,D,...",
        help="the shape of a random float32 input (once per input, in order), where the program was saved "
        "without example inputs or to check and time at another shape",
    )


def run(args: argparse.Namespace) -> int:
    source, output = Path(args.model), Path(args.output)
    _check_options(args, source, output)
    program = _load(source)
    if not has_batch_norm(program):
        raise ValueError(f"{source} has no batch norm: nothing to fold")
    inputs = _inputs(program, args.input_shape, source)
    folded, report = fold_program(program, inputs)
    print(f"{source}: {report}")
    if not report.folded:
        raise ValueError(f"no batch norm of {source} can be folded (see above); nothing written")
    error, tolerance = max_error(program, folded, inputs)
    if not error <= tolerance:
        raise ValueError(f"parity failed: the folded program's outputs differ from the original's by {error:.3g} "
                         f"of their scale (tolerance {tolerance:g}); nothing written")  # fmt: skip
    print(f"parity: largest difference {error:.2g} of the output scale (tolerance {tolerance:g})")
    before, after = _time_eval(program, folded, inputs, args.repeats)
    print(f"eval: original {before * 1e3:.3f} ms, folded {after * 1e3:.3f} ms, speedup {before / after:.2f}x "
          f"(median of {args.repeats} interleaved runs)")  # fmt: skip
    _save(folded, output)
    print(f"saved {output}")
    return 0


def _check_options(args: argparse.Namespace, source: Path, output: Path) -> None:
    """Usage mistakes and an output that cannot be written, before any work."""
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, not {args.repeats}")
    if not source.is_file():
        raise ValueError(f"{source}: no such file" if not source.exists() else f"{source} is not a file")
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError(f"-o {output} is the input program; choose another output")
    if output.exists() and not args.force:
        raise UsageError(f"-o {output} exists; pass --force to replace it")
    if output.exists() and not output.is_file():
        raise ValueError(f"{output} exists and is not a file")
    folder = output.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {output}: folder {folder} is not writable")


def _load(source: Path) -> torch.export.ExportedProgram:
    if not zipfile.is_zipfile(source):
        raise ValueError(f"{source} is not a saved torch.export program (not a zip archive)")
    logger = logging.getLogger("torch.export")  # it logs a traceback of its own before raising
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        program = torch.export.load(source)
    except Exception as error:  # a zip of something else, a truncated file, any other file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        why = "torch.export.load cannot read it" if "warnings above" in first else first  # they are silenced
        raise ValueError(f"{source} is not a saved torch.export program ({why})") from None
    finally:
        logger.setLevel(level)
    if not isinstance(program, torch.export.ExportedProgram):
        raise ValueError(f"{source} is not a saved torch.export program")
    return program


def _inputs(program: torch.export.ExportedProgram, shapes: list[str] | None, source: Path) -> tuple[tuple, dict]:
    """The example inputs to fold, check and time with: ``--input-shape``'s, else the program's."""
    if shapes:
        return tuple(torch.randn(_shape(text)) for text in shapes), {}
    inputs = example_inputs_of(program)
    if inputs is None:
        raise UsageError(f"{source} was saved without example inputs; give their shapes with --input-shape")
    return inputs


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 0 for d in shape):
        raise UsageError(f"--input-shape {text!r} is not a shape such as 2,3,32,32")
    return shape


def _time_eval(original, folded, inputs: tuple[tuple, dict], repeats: int) -> tuple[float, float]:
    """Median seconds per call of each program's module, timed in turn (a noisy machine slows both alike)."""
    args, kwargs = inputs
    modules = [original.module(), folded.module()]
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for module in modules:  # warm-up
            module(*args, **kwargs)
        for _ in range(repeats):
            for module, record in zip(modules, times, strict=True):
                start = time.perf_counter()
                module(*args, **kwargs)
                record.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _save(program: torch.export.ExportedProgram, output: Path) -> None:
    """Save next to ``output``, then move it into place: an interrupted run leaves no half-written file."""
    handle, staging = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp.pt2", dir=output.parent)
    os.close(handle)
    try:
        torch.export.save(program, staging)
        os.replace(staging, output)
    except OSError as error:
        raise ValueError(f"cannot write {output}: {error.strerror or error}") from None
    finally:
        if os.path.exists(staging):
            os.remove(staging)
