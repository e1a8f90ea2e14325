"""The ``batchnorm`` command: ``batchnorm demo`` and ``batchnorm bench``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int``; this file only dispatches, and turns any failure into
one readable line and a non-zero exit: 2 for a usage mistake (argparse's, or a
:class:`UsageError` naming the option), 1 for anything else
(``BATCHNORM_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .usage import UsageError

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "demo": (
        "batchnorm.experiments.demo",
        "train with and without batch norm, at small batches and on a shifted test set, and report what changes",
    ),
    "bench": ("batchnorm.benchmark", "time our kernels against torch eager and torch.compile"),
    "fold": ("batchnorm.fold_command", "fold the batch norms of a saved torch.export program (.pt2) away"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and exit 2), not usage plus error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="batchnorm", description="Batch normalization for PyTorch.")
    parser.add_argument("--version", action="version", version=f"batchnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0), or a usage mistake, already printed (2)
        return done.code if isinstance(done.code, int) else 0
    try:
        if args.command is None:  # a bare `batchnorm`: what it can do
            parser.print_help()
            return 0
        return int(args._run(args) or 0)
    except UsageError as error:
        print(f"batchnorm {args.command}: error: {error} (see batchnorm {args.command} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchnorm: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line, not a traceback, unless asked for
        if os.environ.get("BATCHNORM_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"batchnorm: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
