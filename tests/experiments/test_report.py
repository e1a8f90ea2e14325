"""What the demo's report says and draws: edges of the grid named, diverged runs said, no misleading
points or zeros, one name per layer, a smoke run marked."""

from __future__ import annotations

import copy

import pytest

from batchnorm.experiments import datasets, report
from batchnorm.experiments.experiment import Config, run_experiment


@pytest.fixture(scope="module")
def tiny():
    cfg = Config.quick(mlp_steps=40, cnn_steps=20, sweep_steps=30, sweep_lrs=(0.1, 1.0, 10.0), sweep_seeds=2)
    return run_experiment(datasets.load("digits"), cfg)


def test_grid_edges_and_first_evaluations_are_named():
    assert report._lr_range([0.1, 10.0], [0.1, 1.0, 10.0]) == (
        "0.1 (the lowest rate tried) to 10 (the highest rate tried)")  # fmt: skip
    assert report._lr_range([1.0, 3.0], [0.1, 1.0, 3.0, 10.0]) == "1 to 3"
    assert report._steps(25, 150, 25) == "at step 25, the first evaluation"
    assert report._steps(50, 150, 25) == "at step 50"
    assert report._steps(None, 150, 25, diverged_at=7) == "never (diverged at step 7)"


def test_a_smoke_run_says_so_and_a_full_run_does_not(tiny):
    results, _ = tiny
    assert results["config"]["smoke_run"] and report.findings(results)[0].startswith("A smoke run (--quick)")
    full = copy.deepcopy(results)
    full["config"]["smoke_run"] = False
    assert not any("smoke run" in line for line in report.findings(full))


def test_a_diverged_arm_says_where_and_shows_no_drift_or_zero(tiny):
    results = copy.deepcopy(tiny[0])
    plain = results["summary"]["mlp"]["plain"]
    plain.update(diverged_at=12, steps_to_target=None, final_test_acc=None, last_hidden_mean_drift_total=None)
    table = "\n".join(report.summary_table(results))
    text = " ".join(report.findings(results))
    assert "diverged at 12" in table and "diverged at step 12" in text
    assert not any("median input" in line and "MLP" in line for line in report.findings(results))  # no drift of it
    results["summary"]["mlp"]["plain"]["diverged_at"] = None
    assert "Summed record-to-record drift of that layer's per-feature input means: -" in " ".join(
        report.findings(results))  # fmt: skip


def test_one_image_accuracy_says_on_how_many_images(tiny):
    results, _ = tiny
    line = next(line for line in report.findings(results) if "one image at a time" in line)
    count = results["summary"]["mlp"]["bn"]["single_image_count"]
    assert f"the first {count} test images" in line or "every test image" in line


def test_figures_name_layers_alike_and_drop_the_untrained_first_point(tiny, monkeypatch, tmp_path):
    results, recorders = tiny
    drawn = {}

    def keep(plt, fig, path):  # instead of writing a PNG: what the figure shows
        try:
            drawn[path.name] = [(ax.get_title(), [list(line.get_xdata()) for line in ax.get_lines()])
                                for ax in fig.axes]  # fmt: skip
        finally:
            plt.close(fig)
        return path.name

    monkeypatch.setattr(report, "_save", keep)
    report.write_figures(results, recorders, tmp_path)
    mlp_titles = [t for t, _ in drawn["mlp_percentiles.png"]]
    cnn_titles = [t for t, _ in drawn["cnn_percentiles.png"]]
    assert all("sigmoid" in t and "hidden3" in t for t in mlp_titles)
    assert all("channel of the last conv layer" in t and "conv3" in t for t in cnn_titles)
    assert [t for t, _ in drawn["mlp_ics.png"]][:3] == ["hidden2", "hidden3", "output"]  # a panel per layer
    (_, acc_lines), _ = drawn["mlp_curves.png"]
    plain_steps, bn_steps = acc_lines[0], acc_lines[1]
    assert plain_steps[0] == 0 and bn_steps[0] > 0  # with BN, step 0's untrained running statistics are not plotted
    names = set(results["mlp"]["arms"]["bn"]["ics"]["layers"]) | set(results["mlp"]["arms"]["bn"]["inputs"]["layers"])
    assert names == {"hidden1", "hidden2", "hidden3", "output"}
