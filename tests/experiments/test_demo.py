"""``batchnorm demo`` end to end: a short run writes a complete, reproducible run folder; bad input gives one line."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from batchnorm import cli

# a --quick run made shorter still: every part runs, in a few seconds (the portable backend: no JIT compilation)
TINY = ["--quick", "--steps", "40", "--cnn-steps", "20", "--sweep-steps", "30", "--lrs", "0.1,1,10", "--seeds", "2",
        "--no-progress", "--backend", "torch", "--threads", "1"]  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def strip_timing(results: dict) -> dict:
    results = dict(results)
    results.pop("timing_seconds")
    for part in ("mlp", "cnn", "sweep"):
        for arm in results[part]["arms"].values():
            arm.pop("seconds")
    return results


# the parts a test of the run folder does not need
ONLY_MLP = "cnn,sweep,small-batch,shift,smoothness,noisy-bn,population"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert cli.main(["demo", *TINY, "--out", str(out), "--seed", "3"]) == 0
    return out


def test_run_folder_is_complete(tiny_run, capsys):
    names = {p.name for p in tiny_run.iterdir()}
    figures = {f"{part}_{kind}.png" for part in ("mlp", "cnn") for kind in ("curves", "percentiles", "drift", "ics")}
    assert names == figures | {"lr_sweep.png", "small_batch.png", "shift.png", "smoothness.png", "noisy_bn.png",
                               "population.png",
                               "results.json", "report.html", "batchnorm-demo-manifest.json"}  # fmt: skip
    assert all((tiny_run / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    results = json.loads((tiny_run / "results.json").read_text())  # strict JSON: no NaN
    assert results["config"]["mlp_steps"] == 40 and results["config"]["seed"] == 3
    assert results["mlp"]["arms"]["bn"]["steps"][-1] == 40
    sweep = results["sweep"]["arms"]["bn"]["per_lr"]
    assert [p["lr"] for p in sweep] == [0.1, 1.0, 10.0] and all(len(p["runs"]) == 2 for p in sweep)
    inference = results["mlp"]["arms"]["bn"]["inference"]
    assert inference["folded_same_predictions"] is True and inference["folded_max_abs_logit_diff"] < 1e-3
    assert inference["single_image_batch_stats_distinct_predictions"] == 1  # BN on one image: output = shift
    ics = results["mlp"]["arms"]["plain"]["ics"]["layers"]
    assert list(ics) == ["hidden1", "hidden2", "hidden3", "output"] and ics["hidden1"]["diff_norm"][0] == 0.0
    page = (tiny_run / "report.html").read_text()
    # the 14 figures, and the six chapters of the story each show one of them again as a thumbnail
    assert page.count("data:image/png;base64,") == 14 + 6 and "What this run shows" in page
    assert page.count("<div class='chapter'>") == 6 and "What the field believes now" in page
    assert "<h2>Small batches</h2>" in page and "<h2>Distribution shift: test-time adaptation</h2>" in page
    assert not list(tiny_run.glob(".*"))  # no staging folder left behind
    assert tiny_run.stat().st_mode & 0o055 == 0o055 & ~_umask()  # an ordinary folder, not a private temp one


def test_same_seed_same_numbers(tiny_run, tmp_path, capsys):
    again = tmp_path / "again"
    assert cli.main(["demo", *TINY, "--out", str(again), "--seed", "3", "--skip", ""]) == 0
    first = strip_timing(json.loads((tiny_run / "results.json").read_text()))
    second = strip_timing(json.loads((again / "results.json").read_text()))
    assert first == second
    printed = capsys.readouterr().out
    assert "MLP steps to 90%" in printed and "report:" in printed


def test_rerun_replaces_only_what_the_demo_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["demo", *TINY, "--out", str(out)]) == 0
    manifest = json.loads((out / "batchnorm-demo-manifest.json").read_text())
    assert "cnn_curves.png" in manifest["files"] and "results.json" in manifest["files"]
    (out / "notes.txt").write_text("my notes on the first run")
    (out / "extra").mkdir()
    (out / "extra" / "train.py").write_text("print('mine')")
    # the same folder again, with fewer parts: the demo's own files are replaced or removed, the rest kept
    assert cli.main(["demo", *TINY, "--skip", ONLY_MLP, "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "my notes on the first run"
    assert (out / "extra" / "train.py").read_text() == "print('mine')"
    assert not (out / "cnn_curves.png").exists() and not (out / "lr_sweep.png").exists()
    assert not (out / "small_batch.png").exists() and not (out / "shift.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert not {"sweep", "small_batch", "shift"} & set(results) and not {"small_batch", "shift"} & set(
        results["summary"])  # fmt: skip
    assert "Small batches" not in (out / "report.html").read_text()
    names = {p.name for p in out.iterdir()}
    assert names == {"notes.txt", "extra", "batchnorm-demo-manifest.json", "results.json", "report.html",
                     *(f"mlp_{k}.png" for k in ("curves", "percentiles", "drift", "ics"))}  # fmt: skip


def test_a_file_edited_after_the_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["demo", *TINY, "--skip", ONLY_MLP, "--out", str(out)]) == 0
    capsys.readouterr()
    edited = (out / "report.html").read_text() + "<!-- my annotations -->"
    (out / "report.html").write_text(edited)
    assert cli.main(["demo", *TINY, "--skip", ONLY_MLP, "--out", str(out)]) == 1
    assert "report.html was changed since an earlier batchnorm demo run" in one_error_line(capsys)
    assert (out / "report.html").read_text() == edited


def test_a_folder_with_foreign_files_is_shared_not_cleared(tmp_path, capsys):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "train.py").write_text("print('mine')")
    (out / "data.csv").write_text("a,b\n1,2\n")
    assert cli.main(["demo", *TINY, "--skip", ONLY_MLP, "--out", str(out)]) == 0
    assert (out / "src" / "train.py").read_text() == "print('mine')" and (out / "data.csv").read_text() == "a,b\n1,2\n"
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("taken", ["results.json", "report.html", "mlp_curves.png", "batchnorm-demo-manifest.json"])
def test_a_name_taken_by_a_foreign_file_stops_the_run_before_training(tmp_path, capsys, taken):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "train.py").write_text("print('mine')")
    (out / "data.csv").write_text("a,b")
    (out / taken).write_text("{}")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(["demo", *TINY, "--out", str(out)]) == 1
    line = one_error_line(capsys)
    assert taken in line and "choose another --out" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(["src", "data.csv", taken])


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(("batchnorm: error: ", "batchnorm demo: error: "))
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--steps", "-5"], 2, "--steps must be a positive integer, got -5"),
        (["--sweep-steps", "0"], 2, "--sweep-steps must be a positive integer"),
        (["--lrs", ""], 2, "--lrs: the learning-rate list is empty"),
        (["--lrs", "0.1,abc"], 2, "--lrs must be comma-separated numbers"),
        (["--lrs", "0.1,-1"], 2, "--lrs: learning rates must be positive"),
        (["--lr", "nan"], 2, "--lr must be a positive number, got nan"),
        (["--lr", "abc"], 2, "argument --lr: invalid float value: 'abc'"),
        (["--seeds", "0"], 2, "--seeds must be a positive integer"),
        (["--steps", "ten"], 2, "argument --steps: invalid int value: 'ten'"),
        (
            ["--skip", "mlp"],
            2,
            "--skip: cannot skip ['mlp']; only cnn, sweep, small-batch, shift, smoothness, noisy-bn, population",
        ),
        (["--data", "imagenet"], 2, "--data: unknown dataset 'imagenet'"),
        (["--data", "mnist:/does/not/exist"], 1, "dataset folder not found"),
        (["--threads", "0"], 2, "--threads must be a positive integer"),
        (["--backend", "cuda-magic"], 2, "--backend: unknown batchnorm backend 'cuda-magic'"),
    ],
)
def test_bad_options_fail_with_one_line(tmp_path, capsys, extra, code, message):
    out = tmp_path / "run"
    assert cli.main(["demo", *TINY, "--out", str(out), *extra]) == code
    line = one_error_line(capsys)
    assert message in line and (code == 1 or line.endswith("(see batchnorm demo --help)")), line
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, nothing left behind


def test_corrupt_dataset_fails_before_training(tmp_path, capsys):
    data = tmp_path / "mnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (data / f"{name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\0\0\0\x05" * 3 + b"\1" * 7))
    out = tmp_path / "run"
    assert cli.main(["demo", *TINY, "--data", f"mnist:{data}", "--out", str(out)]) == 1
    assert "corrupt IDX file" in one_error_line(capsys)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]


def test_unwritable_or_foreign_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", *TINY, "--out", str(blocker / "run")]) == 1
    assert "cannot write output folder" in one_error_line(capsys)
    assert cli.main(["demo", *TINY, "--out", str(blocker)]) == 1
    assert "is not a folder" in one_error_line(capsys)


def test_command_line_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "batchnorm.cli", "demo", "--quick", "--lrs", ",", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "batchnorm demo: error: --lrs: the learning-rate list is empty (see batchnorm demo --help)"]  # fmt: skip
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("kind", ["fashion-mnist", "cifar10"])
def test_demo_runs_on_local_dataset_files(tmp_path, seed, capsys, kind):
    import numpy as np

    from tests.experiments.test_datasets import write_cifar, write_mnist

    rng = np.random.default_rng(seed)
    if kind == "cifar10":
        write_cifar(tmp_path / "data", rng, n=30)  # 150 training images
    else:
        write_mnist(tmp_path / "data", rng, n_train=150, n_test=40, size=28)
    out = tmp_path / "run"
    # the MLP alone on the IDX data; on 3-channel images the CNN, small batches and the shifts too
    skip = "sweep" if kind == "cifar10" else ONLY_MLP
    assert cli.main(["demo", *TINY, "--steps", "10", "--cnn-steps", "5", "--skip", skip,
                     "--data", f"{kind}:{tmp_path / 'data'}", "--out", str(out)]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    shape = [3, 32, 32] if kind == "cifar10" else [1, 28, 28]
    assert results["dataset"] == {"name": kind, "train": 150, "test": 30 if kind == "cifar10" else 40,
                                  "image_shape": shape, "classes": 10}  # fmt: skip
    assert results["mlp"]["arms"]["bn"]["steps"][-1] == 10 and results["backend"] == "torch"
    if kind == "cifar10":
        assert set(results["shift"]["shifts"]) == {"noise", "contrast", "translate"}
        assert all(len(v) == 1 for v in results["small_batch"]["test_acc"]["ghost"].values())


def test_progress_is_a_line_every_few_seconds_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    from batchnorm.experiments import demo

    monkeypatch.setattr(demo, "PROGRESS_EVERY_S", 0.0)  # every update, for the test
    args = [a for a in TINY if a != "--no-progress"]
    assert cli.main(["demo", *args, "--skip", ONLY_MLP, "--out", str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("MLP, both arms: ") for line in lines)
    assert lines[-1].startswith("MLP, both arms: 80/80 steps (100%)")


def test_help_names_every_part_and_says_what_each_panel_shows():
    import argparse

    from batchnorm.experiments import demo
    from batchnorm.experiments.experiment import PARTS

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    text = parser.format_help()
    start = text.index("leave out parts")
    skip = " ".join(text[start : text.index("--threads N", start)].split())
    panels = text[text.index("what report.html shows") :]
    for part in PARTS:
        assert part in skip
        assert re.search(rf"^  ([\w-]+, )*{re.escape(part)}[ ,]", panels, re.MULTILINE), part
    assert "the story" in panels and "Wu & Johnson" in panels
