"""The demo's population-statistics part: the moving averages it keeps against the layers' own, what a small
run records, the summary and sentences on hand-built numbers, and the report's figure and section."""

from __future__ import annotations

import copy
import html
import math

import matplotlib
import pytest
import torch

import batchnorm
from batchnorm.experiments import population, population_report
from batchnorm.experiments.experiment import Config
from batchnorm.experiments.models import mlp
from batchnorm.experiments.training import accuracy, train

pytestmark = pytest.mark.usefixtures("one_thread")  # the demo runs digits on one thread

matplotlib.use("Agg")


def small_config(**overrides) -> Config:
    base = dict(mlp_steps=40, eval_every=20, hidden=(16, 16), population_norm_batches=(4, 60),
                population_momenta=(0.3, 0.1, 0.01), population_samples=(30, 120), population_draws=2,
                population_seeds=1)  # fmt: skip
    base.update(overrides)
    return Config(**base)


@pytest.fixture(scope="module")
def run(digits):
    return population.run_population(digits, small_config())


def _tensors(data):
    return [torch.from_numpy(a) for a in (data.x_train, data.y_train, data.x_test, data.y_test)]


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_moving_averages_are_the_running_statistics_training_leaves(digits, momentum):
    """Kept beside a layer trained with momentum m, the average at m equals the layer's own buffers."""
    x_train, y_train, x_test, y_test = _tensors(digits)
    norm = lambda width: batchnorm.BatchNorm1d(width, momentum=momentum)  # noqa: E731
    model = mlp(64, 10, bn=True, hidden=(16, 16), seed=1, norm=norm)
    averages = population.MovingAverages(model, (0.5, momentum, 0.01))
    train(model, x_train, y_train, x_test, y_test, steps=30, lr=1.0, batch_size=60, seed=1, eval_every=10)
    averages.detach()
    copied = copy.deepcopy(model)
    averages.load(copied, 1)
    for (name, ours), (_, theirs) in zip(batchnorm.population.batch_norm_layers(copied),
                                         batchnorm.population.batch_norm_layers(model), strict=True):  # fmt: skip
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6, msg=name)
    averages.load(copied, 0)
    assert not torch.allclose(copied[2].running_mean, model[2].running_mean)  # another momentum: other statistics


def test_effective_samples_is_the_uniform_average_with_the_same_variance():
    assert population.effective_samples(1.0, 60) == 60  # momentum 1: the last batch alone
    assert population.effective_samples(0.1, 60) == pytest.approx(1140)
    # the variance of an EMA of i.i.d. batch means with unit variance is m / (2 - m): that of n_eff / B batches
    m = 0.05
    weights = torch.tensor([m * (1 - m) ** k for k in range(4000)], dtype=torch.float64)
    assert float(weights.pow(2).sum()) == pytest.approx(60 / population.effective_samples(m, 60), rel=1e-9)


def test_a_small_run_records_every_estimate_and_gap(run, digits):
    assert run["samples"] == [30, 120] and run["whole_set"] == len(digits.x_train) and run["norm_batches"] == [4, 60]
    (est,) = run["estimates"]
    assert [len(est["precise"][n]) for n in ("30", "120")] == [2, 2]
    assert [a["momentum"] for a in est["moving_average"]] == [0.3, 0.1, 0.01]
    scores = [*est["precise"]["30"], *est["precise"]["120"], est["precise_whole_set"], est["as_trained"],
              *est["moving_average"]]  # fmt: skip
    for score in scores:
        assert math.isfinite(score["error"]) and score["error"] >= 0 and 0 <= score["test_acc"] <= 1
        assert set(score["layer_errors"]) == {"2", "5"}
    # the layers' own statistics (momentum 0.1) are the moving average at 0.1, in float32
    assert est["as_trained"]["error"] == pytest.approx(est["moving_average"][1]["error"], rel=1e-3)
    assert est["precise_whole_set"]["error"] < min(d["error"] for d in est["precise"]["30"])
    for v in ("4", "60"):
        (g,) = run["gaps"][v]
        assert g["diverged_at"] is None
        for split in ("test", "train"):
            assert g[split]["batch_size"] == int(v) and 0 <= g[split]["batch_statistics"] <= 1
            assert g[split]["gap"] == pytest.approx(g[split]["batch_statistics"] - g[split]["population_statistics"])


def test_the_plain_run_is_the_demos_bn_arm(run, digits):
    """The estimates come from the network the demo's first part trains (same seed, same batches)."""
    x_train, y_train, x_test, y_test = _tensors(digits)
    cfg = small_config()
    model = mlp(64, 10, bn=True, hidden=cfg.hidden, init_std=cfg.init_std, seed=cfg.seed)
    train(model, x_train, y_train, x_test, y_test, steps=cfg.mlp_steps, lr=cfg.mlp_lr, batch_size=cfg.batch_size,
          seed=cfg.seed, eval_every=cfg.mlp_steps)  # fmt: skip
    assert run["gaps"]["60"][0]["eval_acc_as_trained"] == accuracy(model, x_test, y_test)


def _score(error, acc):
    return {"error": error, "test_acc": acc, "layer_errors": {}}


def _hand_built():
    """Two seeds; errors chosen so the medians and the matching sample count are known."""
    def estimate(shift):
        return {
            "precise": {"30": [_score(0.4 + shift, 0.8), _score(0.2 + shift, 0.9)],
                        "120": [_score(0.05 + shift, 0.95), _score(0.03 + shift, 0.97)]},
            "precise_whole_set": _score(0.01 + shift, 0.97),
            "moving_average": [{"momentum": 0.1, "effective_samples": 1140.0, **_score(0.1 + shift, 0.96)},
                               {"momentum": 0.001, "effective_samples": 119940.0, **_score(0.5 + shift, 0.7)}],
            "as_trained": _score(0.1 + shift, 0.96),
            "truth_test_acc": 0.97,
        }  # fmt: skip

    def gap(batch, population_):
        return {"batch_size": 2, "samples": 10, "batch_statistics": batch, "population_statistics": population_,
                "gap": batch - population_}  # fmt: skip

    runs = {"2": [{"seed": s, "diverged_at": None, "test": gap(0.3, 0.7), "train": gap(0.3, 0.8)} for s in (0, 1)],
            "60": [{"seed": 0, "diverged_at": None, "test": gap(0.95, 0.96), "train": gap(0.99, 1.0)},
                   {"seed": 1, "diverged_at": 7}]}  # fmt: skip
    return {"seeds": [0, 1], "draws": 2, "samples": [30, 120], "whole_set": 1347, "batch": 60, "layer_momentum": 0.1,
            "norm_batches": [2, 60], "momenta": [0.1, 0.001], "lr": 3.0, "steps": 100,
            "estimates": [estimate(0.0), estimate(0.02)], "gaps": runs}  # fmt: skip


def test_summary_of_hand_built_numbers():
    s = population.summarize_population(_hand_built())
    assert s["seeds_estimated"] == 2
    assert s["precise"]["30"]["error"] == pytest.approx(0.31)  # median of 0.4, 0.2, 0.42, 0.22
    assert s["precise"]["120"]["error"] == pytest.approx(0.05)  # of 0.05, 0.03, 0.07, 0.05
    assert s["moving_average"]["0.1"] == {"effective_samples": 1140.0, "error": pytest.approx(0.11),
                                          "test_acc": pytest.approx(0.96)}  # fmt: skip
    assert s["samples_to_match_moving_average"] == 120  # 0.05 <= 0.11, 0.31 is not
    assert s["gaps"]["2"]["test_gap"] == pytest.approx(-0.4) and s["gaps"]["2"]["diverged"] == 0
    assert s["gaps"]["60"]["diverged"] == 1 and s["gaps"]["60"]["test_gap"] == pytest.approx(-0.01)


def test_sentences_say_what_the_numbers_show():
    r = _hand_built()
    s = population.summarize_population(r)
    est = population_report.estimation_sentence(r, s)
    assert "falls with the samples used, from 0.31 at 30 samples to 0.05 at 120" in est
    assert "precise statistics match it from 120 samples" in est
    assert "the smallest error is at momentum 0.1" in est and "momentum tried (0.001" in est
    gap = population_report.gap_sentence(r, s)
    assert "disagree most at normalization batch 2 (-40.0 points) and least at 60 (-1.0 points)" in gap
    assert "(1 runs diverged and are left out)" in gap
    for run in r["gaps"]["2"]:
        run["test"].update(batch_statistics=0.7, gap=0.0)
    s = population.summarize_population(r)
    assert "is no larger than at 60" in population_report.gap_sentence(r, s)
    r["estimates"][0]["precise"]["120"] = r["estimates"][0]["precise"]["30"]
    r["estimates"][1]["precise"]["120"] = r["estimates"][1]["precise"]["30"]
    s = population.summarize_population(r)
    assert "does not fall" in population_report.estimation_sentence(r, s)
    assert "no precise estimate of up to 120 samples matches it" in population_report.estimation_sentence(r, s)


def test_report_draws_the_figure_and_writes_the_section(run, tmp_path):
    import matplotlib.pyplot as plt

    results = {"population": run, "summary": {"population": population.summarize_population(run)}}
    names = population_report.write_figures(plt, results, lambda fig, name: (fig.savefig(tmp_path / name), name)[1])
    assert names == ["population.png"] and (tmp_path / "population.png").stat().st_size > 10_000
    page = population_report.html_sections(results, lambda name: f"<img {name}>", names)
    assert "<img population.png>" in page and "statistics error" in page
    for line in population_report.findings(results):
        assert html.escape(line) in page
    lines = population_report.text_tables(results)
    assert any("moving average, momentum 0.1 (as trained)" in line for line in lines)
    plt.close("all")


def test_config_rejects_bad_population_settings():
    with pytest.raises(ValueError, match="normalization batch sizes"):
        Config(population_norm_batches=(1, 60)).validate()
    with pytest.raises(ValueError, match="momenta"):
        Config(population_momenta=(0.0,)).validate()
    with pytest.raises(ValueError, match="sample counts"):
        Config(population_samples=()).validate()
    with pytest.raises(ValueError, match="population-draws"):
        Config(population_draws=0).validate()
