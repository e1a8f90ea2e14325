"""Run the benchmark from a checkout: ``python benchmarks/run.py [options]``.

The same as ``batchnorm bench [options]``; see ``python benchmarks/run.py --help``
and ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import sys

from batchnorm import benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=benchmark.__doc__.splitlines()[0])
    benchmark.add_arguments(parser)
    return benchmark.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
