"""The report's narrative: each chapter's verdict follows the run's numbers both ways, a skipped part drops its
chapter, and the HTML shows every claim with its numbers, verdict and figure."""

from __future__ import annotations

import copy
import json

import pytest

from batchnorm.experiments import story
from batchnorm.experiments.story import AGREES, DISAGREES, MIXED


def _arm(steps, diverged=None, **extra):
    return {"steps_to_target": steps, "diverged_at": diverged, "final_test_acc": 0.9, **extra}


def _results() -> dict:
    """A run that comes out as the field's account says, every part present."""
    mlp_plain = _arm(1150, last_hidden_median_range=[-6.0, -2.5], last_hidden_mean_drift_total=29.5,
                     ics_mean_relative_diff={"hidden1": 0.0, "hidden2": 0.5, "hidden3": 0.8})  # fmt: skip
    mlp_bn = _arm(100, last_hidden_median_range=[-2.5, -1.5], last_hidden_mean_drift_total=13.8,
                  ics_mean_relative_diff={"hidden1": 0.0, "hidden2": 0.6, "hidden3": 0.9},
                  single_image_acc_batch_stats=0.1, single_image_acc_population=0.97,
                  folded_same_predictions=True)  # fmt: skip
    smooth = {m: {"median_plain": 1.0, "median_bn": 0.1, "bn_smaller_at": 20}
              for m in ("loss_range", "gradient_predictiveness", "beta_smoothness")}  # fmt: skip
    noisy_arms = {a: {"steps_to_target": s, "diverged_at": None, "instability": {"mean_step_change": c}}
                  for a, s, c in (("plain", 1150, 0.6), ("bn", 100, 0.02), ("noisy", 50, 1.7))}  # fmt: skip
    gaps = {"2": {"test_gap": -0.3, "test_batch_statistics": 0.4, "test_population_statistics": 0.7},
            "60": {"test_gap": -0.01, "test_batch_statistics": 0.97, "test_population_statistics": 0.98}}  # fmt: skip
    return {
        "config": {"target": 0.9},
        "noisy_bn": {"arms": noisy_arms, "target": 0.9, "layer": "hidden3"},
        "smoothness": {},
        "population": {"norm_batches": [2, 60]},
        "summary": {
            "mlp": {"plain": mlp_plain, "bn": mlp_bn},
            "cnn": {"plain": _arm(250), "bn": _arm(25)},
            "sweep": {"bn": {"trains_lr_range": [0.1, 30.0], "status": {"0.1": "trains", "3.0": "trains",
                                                                        "30.0": "trains"}},
                      "plain": {"trains_lr_range": [3.0, 3.0], "status": {"0.1": "fails", "3.0": "trains",
                                                                          "30.0": "diverged"}}},
            "smoothness": {"probes_compared": 24, "seeds": 3, **smooth},
            "population": {"seeds_estimated": 2, "as_trained": {"error": 0.02}, "precise_whole_set": {"error": 0.004},
                           "gaps": gaps},
        },
    }  # fmt: skip


def _verdicts(results) -> dict[str, str]:
    return {c.title.split(".")[0]: c.verdict for c in story.chapters(results)}


def test_a_run_like_the_literature_agrees_with_every_chapter():
    chapters = story.chapters(_results())
    assert [c.title.split(".")[0] for c in chapters] == ["1", "2", "3", "4", "5", "6"]
    assert all(c.verdict == AGREES for c in chapters), [(c.title, c.verdict_text) for c in chapters]
    speed, drift, ics, noisy, smooth, inference = chapters
    assert "step 100 with BN and at step 1150 without" in speed.measured and "3 only without" in speed.measured
    assert "range of 3.50 without BN and 1.00 with BN" in drift.measured
    assert "hidden2 0.5 without BN and 0.6 with" in ics.measured and "hidden1" not in ics.measured
    assert "noisy BN step 50" in noisy.measured and "noisy BN 1.7" in noisy.measured
    assert "24 points of training over 3 seeds" in smooth.measured
    assert "statistics error of 0.02" in inference.measured and "41" not in inference.measured
    assert "40.0% normalizing by batch statistics" in inference.measured
    assert [c.figure for c in chapters] == ["lr_sweep.png", "mlp_percentiles.png", "mlp_ics.png", "noisy_bn.png",
                                            "smoothness.png", "population.png"]  # fmt: skip


def test_verdicts_turn_with_the_numbers():
    r = _results()
    r["summary"]["mlp"]["bn"]["steps_to_target"] = 2000
    r["summary"]["cnn"]["bn"]["steps_to_target"] = None
    r["summary"]["sweep"]["bn"]["status"] = {"0.1": "fails", "3.0": "trains", "30.0": "diverged"}
    r["summary"]["mlp"]["bn"]["last_hidden_mean_drift_total"] = 40.0
    r["summary"]["mlp"]["bn"]["ics_mean_relative_diff"] = {"hidden1": 0.0, "hidden2": 0.1, "hidden3": 0.2}
    for m in ("loss_range", "gradient_predictiveness", "beta_smoothness"):
        r["summary"]["smoothness"][m]["bn_smaller_at"] = 3
    r["noisy_bn"]["arms"]["noisy"]["steps_to_target"] = None
    r["summary"]["mlp"]["bn"]["single_image_acc_population"] = 0.05
    assert _verdicts(r) == {"1": DISAGREES, "2": MIXED, "3": DISAGREES, "4": DISAGREES, "5": DISAGREES,
                            "6": DISAGREES}  # fmt: skip
    r["summary"]["mlp"]["bn"]["ics_mean_relative_diff"] = {"hidden1": 0.0, "hidden2": 0.45, "hidden3": 0.5}
    r["summary"]["smoothness"]["loss_range"]["bn_smaller_at"] = 20
    verdicts = _verdicts(r)
    assert verdicts["3"] == MIXED and verdicts["5"] == MIXED  # slightly lower ICS; smoother by one measure only


def test_gradient_ics_verdict_categories():
    plain = {"first": 1.0, "a": 1.0, "b": 1.0}
    cases = (((0.7, 0.5), story.LOWER), ((0.9, 0.7), story.SLIGHTLY_LOWER),
             ((1.3, 2.0), "higher with BN in every layer"), ((0.5, 1.1), "not consistently lower with BN"))  # fmt: skip
    for bn, expected in cases:
        layers, verdict = story.gradient_ics_verdict(plain, {"first": 9.0, "a": bn[0], "b": bn[1]})
        assert layers == ["a", "b"] and verdict == expected
    assert story.gradient_ics_verdict({"only": 1.0}, {"only": 1.0}) == ([], None)


@pytest.mark.parametrize(("dropped", "chapter"), [("noisy_bn", "4"), ("smoothness", "5")])
def test_a_skipped_part_drops_its_chapter(dropped, chapter):
    r = _results()
    del r[dropped]
    assert chapter not in _verdicts(r) and len(_verdicts(r)) == 5


def test_without_the_sweep_and_population_the_chapters_use_what_ran():
    r = _results()
    del r["summary"]["sweep"], r["population"], r["summary"]["population"]
    chapters = {c.title.split(".")[0]: c for c in story.chapters(r)}
    assert chapters["1"].figure == "mlp_curves.png" and "learning rates" not in chapters["1"].measured
    assert chapters["6"].figure == "mlp_curves.png" and "statistics error" not in chapters["6"].measured
    del r["summary"]["mlp"]
    assert list(_verdicts(r)) == ["1", "4", "5"]


def test_html_section_shows_claims_numbers_verdicts_and_figures():
    r = _results()
    page = story.html_section(r, lambda name: f"<img {name}>", ["lr_sweep.png", "smoothness.png"])
    assert page.count("<div class='chapter'>") == 6 and page.count("<img ") == 2
    assert "6 agree, 0 partly, 0 disagree" in page and "What the field believes now" in page
    assert page.count("class='verdict agrees'") == 6
    assert json.loads(json.dumps(story.to_json(r)))[4]["verdict"] == AGREES
    assert story.html_section({"config": {"target": 0.9}, "summary": {}}, str, []) == ""


def test_chapters_do_not_change_the_results():
    r = _results()
    before = copy.deepcopy(r)
    story.chapters(r)
    assert r == before
