"""The benchmark runner: its case table, its checks, its output files, its options for GPU runs (as far
as a CPU shows them); real runs of small cases."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from batchnorm import benchmark, cases
from batchnorm.cases import Case


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def test_resnet50_set_has_every_distinct_layer_in_both_layouts():
    r50 = [c for c in cases.cases() if c.group == "resnet50"]
    assert len(r50) == 24
    assert sum(c.channels_last for c in r50) == 12
    assert {c.shape for c in r50} >= {(32, 64, 112, 112), (32, 256, 56, 56), (32, 2048, 7, 7)}
    assert all(c.shape[0] == 32 for c in r50)
    mlp = {c.shape for c in cases.cases() if c.group == "mlp"}
    assert mlp == {(256, 1024), (4096, 4096)}


def test_case_table_names_and_shapes():
    table = cases.cases()
    names = [c.name for c in table]
    assert len(names) == len(set(names)) == 29
    # the names the READMEs quote, with the shapes they stand for
    by_name = {c.name: c for c in table}
    assert by_name["r50-512x7-nhwc"].shape == (32, 512, 7, 7) and by_name["r50-512x7-nhwc"].channels_last
    assert by_name["r50-128x56-nchw"].shape == (32, 128, 56, 56) and not by_name["r50-128x56-nchw"].channels_last
    assert by_name["small-4x32x16x16-nhwc"].channels_last and by_name["mlp-4096x4096"].shape == (4096, 4096)
    assert names[:12] == [f"r50-{c}x{h}-nchw" for _, c, h, _ in cases.resnet50_shapes()]
    assert [c.group for c in table] == sorted((c.group for c in table), key=cases.GROUPS.index)
    assert set(cases.QUICK) <= set(names)
    # ResNet-50 at another batch and input size: the sides follow the stride-2 steps (rounding up)
    assert cases.resnet50_shapes(256)[0] == (256, 64, 112, 112)
    assert [s[2] for s in cases.resnet50_shapes(2, side=100)] == [50, 25, 25, 25, 13, 13, 13, 7, 7, 7, 4, 4]
    assert [c.shape[0] for c in cases.cases(["resnet50"], batch=256)] == [256] * 24
    assert all(c.channels_last for c in cases.cases(channels_last=True))
    assert len(cases.cases(["mlp", "small"], channels_last=False)) == 4
    with pytest.raises(ValueError, match="unknown case group"):
        cases.cases(["resnet"])


def test_shrink_keeps_what_makes_a_case_distinct():
    for case in cases.cases(batch=256):
        small = cases.shrink(case)
        assert small.numel <= cases.SHRUNK_NUMEL and small.numel // small.channels >= 2
        assert (small.name, small.group, small.channels, small.channels_last, len(small.shape)) == (
            case.name, case.group, case.channels, case.channels_last, len(case.shape))  # fmt: skip
        assert small.shape[2:] == () or small.shape[2] == small.shape[3]  # square images stay square
    assert cases.shrink(Case("s", "small", (8, 16, 8, 8))).shape == (8, 16, 8, 8)  # fits: unchanged
    assert cases.shrink(Case("m", "mlp", (4096, 4096))).shape == (12, 4096)
    with pytest.raises(ValueError, match="do not fit"):
        cases.shrink(Case("w", "mlp", (4, 30_000)))


def test_case_filter_and_quick():
    assert [c.name for c in benchmark._select_cases(parse("--cases", "mlp-4096"))] == ["mlp-4096x4096"]
    quick = benchmark._select_cases(parse("--quick"))
    assert {c.name for c in quick} == set(cases.QUICK)
    assert benchmark._select_cases(parse("--cases", "r50-64x112-nchw", "--batch", "8"))[0].shape == (8, 64, 112, 112)
    gpu = benchmark._select_cases(parse("--device", "cuda", "--cases", "r50"))  # batch 256 on a GPU
    assert len(gpu) == 24 and {c.shape[0] for c in gpu} == {256}
    dry = benchmark._select_cases(parse("--device", "cuda", "--dry-run"))
    assert [c.name for c in dry] == [c.name for c in cases.cases()] and max(c.numel for c in dry) <= 50_000


def test_run_writes_markdown_and_csv(tmp_path, capsys):
    args = parse("--quick", "--no-compile", "--cases", "small-32x64,small-4x32", "--repeats", "1",
                 "--out", str(tmp_path))  # fmt: skip
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "| small-32x64 | 32x64 | train-fwdbwd |" in printed
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(benchmark.MODES)
    assert {r["mode"] for r in rows} == set(benchmark.MODES)
    for r in rows:
        assert float(r["ours_ms"]) > 0 and float(r["torch_ms"]) > 0 and r["compile_ms"] == ""
        # the ratio of the unrounded times: within what rounding the times to 4 decimals allows
        ours, theirs, half = float(r["ours_ms"]), float(r["torch_ms"]), 5e-5
        assert (theirs - half) / (ours + half) - 1e-3 <= float(r["vs_torch"]) <= (theirs + half) / (ours - half) + 1e-3
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| small-") == 2 * len(benchmark.MODES) and "small shapes: ours/torch time" in table
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
    case = Case("t", "small", (4, 3, 5))
    x, dy = benchmark._inputs(case, torch.device("cpu"), torch.float32)
    ours, theirs = benchmark._layers(case, torch.device("cpu"), torch.float32)
    good = {"ours": (ours(x),), "torch": (theirs(x),)}
    benchmark._validate(case, "train-fwd", good, x, dy, ours)
    bad = {"ours": (good["ours"][0] * 1.01,), "torch": good["torch"]}
    with pytest.raises(AssertionError, match="differs from torch eager"):
        benchmark._validate(case, "train-fwd", bad, x, dy, ours)


@pytest.mark.parametrize("mode", benchmark.FUSED_MODES)
def test_fused_modes_check_every_gradient_against_torch(mode):
    case = Case("t", "small", (4, 3, 5, 5), channels_last=True)
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
        return benchmark.Row(Case("c", group, shape), mode, ours, theirs, compiled, 1.0, frac)

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
    assert "at most 1000 us per call over torch's; target <= 1.2: not met (why: benchmarks/README.md" in text
    assert "channels-last" not in text and "BN+SiLU" not in text  # no such rows, no such lines

    last = (32, 256, 56, 56)
    more = [
        benchmark.Row(Case("cl", "resnet50", last, True), "train-fwdbwd", 1.0, 1.6, None, 1.0, 0.7),
        row("resnet50", "fused-silu", big, 1.0, 2.5, None, 0.5),
        row("resnet50", "fused-add-relu", big, 1.0, 1.1, None, 0.5),
    ]
    text = "\n".join(benchmark._summary(rows + more))
    assert "channels-last alone (1 cases): geomean 1.60x torch eager (target >= 1.5x: met)" in text
    assert "train-fwdbwd, large cases (3): 50% of copy bandwidth median" in text and "(target >= 75%: not met" in text
    assert "NCHW 50%, channels-last 70% of copy bandwidth, 29% apart (target <= 10%: not met" in text
    assert "BN+SiLU fwd+bwd, ResNet-50 set (1 cases): geomean 2.50x torch eager (target >= 2x: met)" in text
    assert "BN+add+ReLU fwd+bwd, ResNet-50 set (1 cases): geomean 1.10x torch eager (target >= 3x: not met" in text
    assert "lowest 1.10x (c; target >= 1.2x: not met" in text


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
    case = Case("t", "resnet50", (4, 3, 5, 5))
    rows = [benchmark.Row(case, "train-fwdbwd", 1.0, 2.0, None, 1.0, 0.1, spread=1.5),
            benchmark.Row(case, "train-fwdbwd", 1.0, 0.5, None, 1.0, 0.1, spread=1.05)]  # fmt: skip
    summary = "\n".join(benchmark._summary(rows))
    assert "target >= 2.5x: not met" in summary and "target >= 1x: not met" in summary
    (note,) = benchmark._noise_note(rows, repeats=2)
    assert "in 1 of 2 rows" in note and "1.5x" in note and "--repeats (now 2)" in note
    assert "~" in benchmark._markdown_row(rows[0]) and "~" not in benchmark._markdown_row(rows[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_cuda_is_one_usage_line(capsys):
    from batchnorm import cli

    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("batchnorm bench: error: --device cuda: torch ") and "no CUDA device" in line
    assert "--dry-run" in line and line.endswith("(see batchnorm bench --help)")
    assert cli.main(["bench", "--device", "tpu"]) == 2
    assert "--device must be cpu or cuda, got 'tpu'" in capsys.readouterr().err


def test_dry_run_of_a_gpu_run_on_the_cpu(tmp_path, capsys):
    args = parse("--device", "cuda", "--dry-run", "--dtype", "bfloat16", "--cases", "r50-2048x7-nhwc,mlp-4096",
                 "--modes", "train-fwdbwd,eval", "--no-compile", "--out", str(tmp_path))  # fmt: skip
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    assert "device cpu, bfloat16 (float32 parameters)" in printed and "dry run: the cases shrunk" in printed
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["shape"], r["mode"]) for r in rows] == [
        ("r50-2048x7-nhwc", "2x2048x2x2", "train-fwdbwd"), ("r50-2048x7-nhwc", "2x2048x2x2", "eval"),
        ("mlp-4096x4096", "12x4096", "train-fwdbwd"), ("mlp-4096x4096", "12x4096", "eval")]  # fmt: skip
    assert "run in progress" not in (tmp_path / "results.md").read_text()


def test_budget_runs_compile_in_a_second_pass_and_rewrites_the_table_after_every_case(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda module: module)  # the harness, not the compiler, is under test
    written = []
    real_write = benchmark._write
    monkeypatch.setattr(
        benchmark, "_write", lambda folder, table, *rest: (written.append(table), real_write(folder, table, *rest))
    )
    args = parse("--quick", "--cases", "small-32x64", "--modes", "eval,train-fwdbwd", "--repeats", "1",
                 "--budget-s", "600", "--out", str(tmp_path))  # fmt: skip
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    first, second = printed.split("again with torch.compile, while the budget lasts:")
    assert first.index("| train-fwdbwd |") < first.index("| eval |")  # the headline mode first
    assert "| train-fwdbwd |" in second and "| eval |" in second
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["eval", "train-fwdbwd"]  # the table's order
    assert all(float(r["compile_ms"]) > 0 for r in rows)
    assert len(written) == 5  # after each of 2 + 2 cases, and the final table
    first_table = "\n".join(written[0])
    assert "- run in progress: 1 of 2 rows" in first_table and first_table.count("| small-32x64") == 1
    assert not any("run in progress" in line for line in written[-1])


def test_a_failing_torch_compile_is_a_result_not_a_failure(monkeypatch, capsys):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("inductor: no kernel for this")

    monkeypatch.setattr(torch, "compile", lambda module: Broken())
    args = parse("--quick", "--cases", "small-32x64", "--modes", "eval", "--repeats", "1", "--budget-s", "600",
                 "--keep-going")  # fmt: skip
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    assert "- torch.compile failed: small-32x64/eval: RuntimeError: inductor: no kernel for this" in printed
    assert "| small-32x64 | 32x64 | eval |" in printed  # the row without torch.compile stays


def test_spent_budget_leaves_rows_out_and_says_so(capsys):
    args = parse("--quick", "--cases", "small-32x64", "--modes", "eval", "--no-compile", "--budget-s", "1e-9")
    assert benchmark.run(args) == 0
    assert "- budget spent: 1 of 1 rows not run" in capsys.readouterr().out


def test_keep_going_reports_a_failing_case_and_exits_1(monkeypatch, capsys):
    real = benchmark._validate

    def validate(case, mode, *rest):
        if mode == "eval":
            raise AssertionError(f"{case.name} {mode}: y differs from torch eager by 1e+00")
        return real(case, mode, *rest)

    monkeypatch.setattr(benchmark, "_validate", validate)
    argv = ("--quick", "--cases", "small-32x64", "--modes", "eval,train-fwd", "--no-compile", "--repeats", "1")
    with pytest.raises(AssertionError, match="differs"):
        benchmark.run(parse(*argv))
    capsys.readouterr()
    assert benchmark.run(parse(*argv, "--keep-going")) == 1
    printed = capsys.readouterr().out
    assert "| small-32x64 | 32x64 | train-fwd |" in printed
    assert "- FAILED small-32x64/eval: AssertionError: small-32x64 eval: y differs from torch eager" in printed


def test_kernels_column_times_our_backend_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BATCHNORM_BACKEND", "numba")
    args = parse("--quick", "--cases", "small-8x16", "--modes", "train-fwd,train-fwdbwd,eval", "--no-compile",
                 "--repeats", "1", "--kernels", "--out", str(tmp_path))  # fmt: skip
    assert benchmark.run(args) == 0
    assert "| GB/s | % copy | backend | kernels ms |" in capsys.readouterr().out
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["backend"] for r in rows] == ["numba"] * 3
    assert float(rows[0]["kernels_ms"]) > 0 and float(rows[1]["kernels_ms"]) > 0 and rows[2]["kernels_ms"] == ""


def test_gpu_targets_in_the_summary():
    def row(mode, ours, theirs, compiled):
        return benchmark.Row(Case("r", "resnet50", (256, 64, 112, 112)), mode, ours, theirs, compiled, 1.0, 0.85)

    text = "\n".join(benchmark._summary([row("train-fwdbwd", 1.0, 1.5, 1.2), row("train-fwd", 1.0, 1.0, None)],
                                       benchmark.TARGETS["cuda"]))  # fmt: skip
    assert "geomean 1.50x torch eager (target >= 1.3x: met)" in text and "1.20x torch.compile in 1" in text
    assert "train-fwd, large cases (1): 85% of copy bandwidth median" in text and "target >= 80%: met" in text
