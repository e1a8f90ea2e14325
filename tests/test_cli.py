"""The ``batchnorm`` command's dispatch: usage mistakes and failures are one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchnorm import cli


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "batchnorm.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    "args,code,pattern",
    [(("nope",), 2, "invalid choice: 'nope'"),
     (("demo", "--no-such-option"), 2, "unrecognized arguments: --no-such-option")],
)  # fmt: skip
def test_usage_mistakes_are_one_line_and_exit_2(args, code, pattern):
    result = _run(*args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0] and lines[0].startswith("batchnorm: error:"), result.stderr


def test_a_failure_inside_a_command_is_one_line(monkeypatch, capsys):
    def explode(args):
        raise FileNotFoundError("no such dataset folder: /nowhere")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo"].set_defaults(_run=explode)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == "batchnorm: error: no such dataset folder: /nowhere\n"


@pytest.mark.parametrize("args", [(), ("--help",)], ids=["bare", "help"])
def test_help_lists_the_commands(args):
    result = _run(*args)
    assert result.returncode == 0 and "demo" in result.stdout and "bench" in result.stdout and not result.stderr


def test_version():
    import batchnorm

    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"batchnorm {batchnorm.__version__}"


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--repeats", "0"), "--repeats must be a positive integer, got 0"),
     (("--threads", "-1"), "--threads must be a positive integer, got -1"),
     (("--modes", "train,fast"), "--modes: unknown mode 'train'; expected some of train-fwd, train-fwdbwd, eval, "
                                 "fused-relu, fused-elu, fused-silu, fused-add-relu, model-train, model-eval, "
                                 "ghost, masked"),
     (("--cases", "r99"), "--cases: no case matches 'r99'")],
)  # fmt: skip
def test_bench_refuses_bad_options_before_any_work(args, message):
    result = _run("bench", "--quick", "--no-compile", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"batchnorm bench: error: {message} (see batchnorm bench --help)"]
