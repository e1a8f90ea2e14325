"""The benchmark runner: its cases, its checks, its output files; a real run of one small case."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from batchnorm import benchmark


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def test_resnet50_set_has_every_distinct_layer_in_both_layouts():
    cases = [c for c in benchmark.all_cases() if c.group == "resnet50"]
    assert len(cases) == 24
    assert sum(c.channels_last for c in cases) == 12
    assert {c.shape for c in cases} >= {(32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7)}
    assert all(c.shape[0] == 32 for c in cases)
    mlp = {c.shape for c in benchmark.all_cases() if c.group == "mlp"}
    assert mlp == {(256, 1024), (4096, 4096)}


def test_case_filter_and_quick():
    assert [c.name for c in benchmark._select_cases(parse("--cases", "mlp-4096"))] == ["mlp-4096x4096"]
    quick = benchmark._select_cases(parse("--quick"))
    assert {c.name for c in quick} == set(benchmark.QUICK_CASES)


def test_run_writes_markdown_and_csv(tmp_path, capsys):
    args = parse("--quick", "--no-compile", "--cases", "small-32x64,small-4x32", "--repeats", "1",
                 "--out", str(tmp_path))  # fmt: skip
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "| small-32x64 | 32x64 | train-fwdbwd |" in printed
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6  # 2 cases x 3 modes
    assert {r["mode"] for r in rows} == set(benchmark.MODES)
    for r in rows:
        assert float(r["ours_ms"]) > 0 and float(r["torch_ms"]) > 0 and r["compile_ms"] == ""
        assert float(r["vs_torch"]) == pytest.approx(float(r["torch_ms"]) / float(r["ours_ms"]), rel=1e-2)
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| small-") == 6 and "small shapes: ours/torch time" in table


def test_validation_rejects_a_wrong_result():
    case = benchmark.Case("t", "small", (4, 3, 5))
    x, dy = benchmark._inputs(case, torch.device("cpu"), torch.float32)
    ours, theirs = benchmark._layers(case, torch.device("cpu"), torch.float32)
    good = {"ours": (ours(x),), "torch": (theirs(x),)}
    benchmark._validate(case, "train-fwd", good, x, dy, ours)
    bad = {"ours": (good["ours"][0] * 1.01,), "torch": good["torch"]}
    with pytest.raises(AssertionError, match="differs from torch eager"):
        benchmark._validate(case, "train-fwd", bad, x, dy, ours)


def test_summary_speaks_to_each_target():
    def row(group, mode, shape, ours, theirs, compiled, frac):
        return benchmark.Row(benchmark.Case("c", group, shape), mode, ours, theirs, compiled, 1.0, frac)

    big = (32, 256, 56, 56)
    rows = [
        row("resnet50", "train-fwdbwd", big, 1.0, 4.0, 2.0, 0.5),
        row("resnet50", "train-fwdbwd", big, 1.0, 1.0, 0.5, 0.5),
        row("resnet50", "train-fwd", big, 1.0, 2.0, None, 0.7),
        row("resnet50", "eval", big, 1.0, 2.0, None, 0.9),
        row("small", "eval", (2, 3), 3.0, 2.0, None, 0.01),
    ]
    text = "\n".join(benchmark._summary(rows))
    assert "geomean 2.00x torch eager" in text and "lowest 1.00x" in text
    assert "train-fwd, large cases (1): 70%" in text and "eval, large cases (1): 90%" in text
    assert "ahead in 1/2" in text and "at most 1.50" in text


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown mode"):
        benchmark.run(parse("--quick", "--no-compile", "--modes", "sideways"))


def test_cli_knows_bench():
    from batchnorm import cli

    args = cli.build_parser().parse_args(["bench", "--quick", "--no-compile"])
    assert args._run is benchmark.run and args.quick and args.no_compile
