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
    assert len(rows) == 10  # 2 cases x 5 modes
    assert {r["mode"] for r in rows} == set(benchmark.MODES)
    for r in rows:
        assert float(r["ours_ms"]) > 0 and float(r["torch_ms"]) > 0 and r["compile_ms"] == ""
        assert float(r["vs_torch"]) == pytest.approx(float(r["torch_ms"]) / float(r["ours_ms"]), rel=1e-2)
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| small-") == 10 and "small shapes: ours/torch time" in table
    # the fused modes bring the memory report: per-block bytes and the ResNet-style client's step
    assert "| BN+ReLU |" in table and "| BN+add+ReLU |" in table and "memory_efficient=True" in table
    assert "| peak of live tensors |" in table and "| kept for the backward |" in table


def test_out_keeps_files_the_bench_did_not_write(tmp_path, capsys):
    (tmp_path / "results.md").write_text("my own notes")
    args = parse("--quick", "--no-compile", "--cases", "small-32x64", "--modes", "eval", "--repeats", "1",
                 "--out", str(tmp_path))  # fmt: skip
    with pytest.raises(ValueError, match=r"results\.md was not written by an earlier batchnorm bench run"):
        benchmark.run(args)
    assert (tmp_path / "results.md").read_text() == "my own notes" and not (tmp_path / "results.csv").exists()
    (tmp_path / "results.md").rename(tmp_path / "notes.md")
    assert benchmark.run(args) == 0
    assert benchmark.run(args) == 0  # the second run replaces the first's files
    assert (tmp_path / "notes.md").read_text() == "my own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "batchnorm-bench-manifest.json", "notes.md", "results.csv", "results.md"]  # fmt: skip


def test_validation_rejects_a_wrong_result():
    case = benchmark.Case("t", "small", (4, 3, 5))
    x, dy = benchmark._inputs(case, torch.device("cpu"), torch.float32)
    ours, theirs = benchmark._layers(case, torch.device("cpu"), torch.float32)
    good = {"ours": (ours(x),), "torch": (theirs(x),)}
    benchmark._validate(case, "train-fwd", good, x, dy, ours)
    bad = {"ours": (good["ours"][0] * 1.01,), "torch": good["torch"]}
    with pytest.raises(AssertionError, match="differs from torch eager"):
        benchmark._validate(case, "train-fwd", bad, x, dy, ours)


@pytest.mark.parametrize("mode", benchmark.FUSED_MODES)
def test_fused_modes_check_every_gradient_against_torch(mode):
    case = benchmark.Case("t", "small", (4, 3, 5, 5), channels_last=True)
    x, dy = benchmark._inputs(case, torch.device("cpu"), torch.float64)
    x.requires_grad_()
    r = torch.randn_like(x).requires_grad_() if mode == "fused-add-relu" else None
    ours, theirs = benchmark._layers(case, torch.device("cpu"), torch.float64, mode)
    results = {"ours": benchmark._step(ours, x, dy, mode, r), "torch": benchmark._step(theirs, x, dy, mode, r)}
    assert len(results["ours"]) == (5 if r is not None else 4)
    context = {"block": theirs, "residual": r}
    benchmark._validate(case, mode, {**results, **context}, x, dy, ours)
    for k in range(len(results["ours"])):  # y, dx, dweight, dbias, dresidual: each is checked
        wrong = list(results["ours"])
        wrong[k] = wrong[k] * 1.01 + 0.01
        with pytest.raises(AssertionError, match="differs from torch eager"):
            benchmark._validate(case, mode, {"ours": wrong, "torch": results["torch"], **context}, x, dy, ours)
    # a backward that ignored the ReLU (dz = dy everywhere) is caught
    plain = benchmark._layers(case, torch.device("cpu"), torch.float64)[0]
    plain.load_state_dict(ours.state_dict())
    ignoring = benchmark._step(plain, x, dy, "train-fwdbwd")
    wrong = [results["ours"][0], *ignoring[1:4], *results["ours"][4:]]
    with pytest.raises(AssertionError, match="differs from torch eager"):
        benchmark._validate(case, mode, {"ours": wrong, "torch": results["torch"], **context}, x, dy, ours)


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
    rows += [
        row("resnet50", "fused-relu", big, 1.0, 3.0, 3.0, 0.5),
        row("resnet50", "fused-relu", big, 1.0, 3.0, 12.0, 0.5),
    ]
    text = "\n".join(benchmark._summary(rows))
    assert "BN+ReLU fwd+bwd, ResNet-50 set (2 cases): geomean 3.00x torch eager (target >= 3x: met)" in text
    assert "6.00x torch.compile" in text
    assert "train fwd+bwd, ResNet-50 set (2 cases): geomean 2.00x torch eager" in text and "lowest 1.00x" in text
    assert "train-fwd, large cases (1): 70%" in text and "eval, large cases (1): 90%" in text
    assert "ahead in 3/4" in text and "at most 1.50" in text


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown mode"):
        benchmark.run(parse("--quick", "--no-compile", "--modes", "sideways"))


def test_cli_knows_bench():
    from batchnorm import cli

    args = cli.build_parser().parse_args(["bench", "--quick", "--no-compile"])
    assert args._run is benchmark.run and args.quick and args.no_compile


def test_console_has_a_header_a_legend_verdicts_and_a_noise_note(capsys):
    args = parse("--quick", "--no-compile", "--cases", "small-32x64", "--modes", "eval", "--repeats", "2")
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    assert "| case | shape | mode | ours ms | torch ms |" in printed and "their time / ours" in printed
    case = benchmark.Case("t", "resnet50", (4, 3, 5, 5))
    rows = [benchmark.Row(case, "train-fwdbwd", 1.0, 2.0, None, 1.0, 0.1, spread=1.5),
            benchmark.Row(case, "train-fwdbwd", 1.0, 0.5, None, 1.0, 0.1, spread=1.05)]  # fmt: skip
    summary = "\n".join(benchmark._summary(rows))
    assert "target >= 2.5x: not met" in summary and "target >= 1x: not met" in summary
    (note,) = benchmark._noise_note(rows, repeats=2)
    assert "in 1 of 2 rows" in note and "1.5x" in note and "--repeats (now 2)" in note
    assert "~" in benchmark._markdown_row(rows[0]) and "~" not in benchmark._markdown_row(rows[1])
