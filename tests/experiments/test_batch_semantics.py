"""The demo's small-batch and distribution-shift parts: what each arm trains, what adaptation may see,
the effects they exist to show (on small, fast configurations), and the sentences the report draws from them."""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm
from batchnorm.experiments import batch_semantics, batch_semantics_report, models
from batchnorm.experiments.experiment import PARTS, Config

pytestmark = pytest.mark.usefixtures("one_thread")  # the demo runs digits on one thread


def small_config(**overrides) -> Config:
    base = dict(small_batch_sizes=(2, 8), small_batch_examples=800, small_batch_seeds=1, ghost_batch=16,
                cnn_steps=80, tent_steps=2)  # fmt: skip
    base.update(overrides)
    return Config(**base)


@pytest.fixture(scope="module")
def small_batches(digits):
    return batch_semantics.run_small_batches(digits, small_config())


@pytest.fixture(scope="module")
def shift(digits):
    return batch_semantics.run_shift(digits, small_config(shifts=("contrast", "noise")))


def test_small_batch_results_cover_every_method_size_and_seed(small_batches):
    r = small_batches
    assert r["methods"] == ["bn", "renorm", "ghost", "precise"] and r["batch_sizes"] == [2, 8]
    for method in r["methods"]:
        assert list(r["test_acc"][method]) == ["2", "8"]
        for values in r["test_acc"][method].values():
            assert len(values) == 1 and all(0.0 <= v <= 1.0 for v in values)
    # the same examples at every size: a smaller batch takes more steps; ghosts take the ghost batch's
    assert r["steps"]["bn"] == {"2": 400, "8": 100} == r["steps"]["renorm"]
    assert r["steps"]["ghost"] == {"2": 50, "8": 50} and r["steps"]["precise"] == {"2": 0, "8": 0}
    summary = batch_semantics.summarize_small_batches(r)
    assert summary["mean_test_acc"]["bn"]["2"] == r["test_acc"]["bn"]["2"][0]


def test_batch_two_hurts_plain_batch_norm(small_batches):
    """The effect the part exists to show: at batch 2 each feature is normalized over two values."""
    acc = small_batches["test_acc"]["bn"]
    assert acc["2"][0] < acc["8"][0] - 0.2


def test_each_arm_builds_the_layer_it_names():
    cfg = small_config(renorm_rmax=2.0, renorm_dmax=1.0)
    renorm = batch_semantics._norm_layer("renorm", 4, cfg)(10)
    assert isinstance(renorm, batchnorm.BatchRenorm1d) and (renorm.rmax, renorm.dmax) == (2.0, 1.0)
    ghost = batch_semantics._norm_layer("ghost", 4, cfg)(10)
    assert type(ghost) is batchnorm.BatchNorm1d and ghost.virtual_batch_size == 4
    plain = batch_semantics._norm_layer("bn", 4, cfg)(10)
    assert type(plain) is batchnorm.BatchNorm1d and plain.virtual_batch_size is None and plain.momentum == 0.1


def test_precise_statistics_are_taken_on_a_copy(digits):
    model = models.mlp(64, 10, bn=True, hidden=(16,), seed=0)
    x = torch.from_numpy(digits.x_train)
    model.train()
    with torch.no_grad():
        model(x[:8])  # running statistics of one batch of 8
    before = copy.deepcopy(model.state_dict())
    x_test, y_test = torch.from_numpy(digits.x_test), torch.from_numpy(digits.y_test)
    acc = batch_semantics._precise_accuracy(model, x, x_test, y_test)
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shifts_do_what_they_say(seed):
    x = torch.rand(5, 1, 8, 8)
    g = torch.Generator().manual_seed(seed)
    noisy = batch_semantics.shift_images(x, "noise", g)
    assert noisy.min() >= 0 and noisy.max() <= 1 and (noisy - x).abs().mean() > 0.1
    low = batch_semantics.shift_images(torch.tensor([0.0, 1.0]), "contrast", g)
    assert torch.allclose(low, torch.tensor([0.35, 0.65]))
    moved = batch_semantics.shift_images(x, "translate", g)
    assert torch.equal(moved[..., 1:, 1:], x[..., :-1, :-1])
    assert (moved[..., 0, :] == 0).all() and (moved[..., :, 0] == 0).all()
    with pytest.raises(ValueError, match="unknown shift 'blur'"):
        batch_semantics.shift_images(x, "blur", g)


def test_adaptation_never_sees_the_images_it_is_scored_on(monkeypatch, seed):
    model = models.cnn((1, 8, 8), 3, bn=True, channels=(4,), seed=0)
    x, y = torch.rand(21, 1, 8, 8), torch.randint(0, 3, (21,))
    halves = batch_semantics._halves(len(x), seed)
    assert sorted(torch.cat(halves).tolist()) == list(range(21))  # disjoint, every image in one
    calls = []
    real_adapt, real_accuracy = batchnorm.adapt, batch_semantics.accuracy

    def adapt(model, batches, **kwargs):
        calls.append({"adapted": torch.cat(list(batches))})
        return real_adapt(model, batches, **kwargs)

    def accuracy(model, xs, ys):
        calls[-1]["scored"] = xs
        return real_accuracy(model, xs, ys)

    monkeypatch.setattr(batchnorm, "adapt", adapt)
    monkeypatch.setattr(batch_semantics, "accuracy", accuracy)
    cfg = small_config(adapt_batch=4)
    acc, entropy = batch_semantics._adapted_accuracy(model, x, y, halves, True, cfg)
    assert len(calls) == 2 and 0.0 <= acc <= 1.0 and set(entropy) == {"entropy_before", "entropy_after"}
    rows = lambda t: {tuple(r.flatten().tolist()) for r in t}  # noqa: E731
    for call in calls:
        assert not rows(call["adapted"]) & rows(call["scored"])
    assert rows(calls[0]["scored"]) | rows(calls[1]["scored"]) == rows(x)  # every image scored once
    assert all(len(c["scored"]) + len(c["adapted"]) == 21 for c in calls)


def test_adapted_statistics_undo_a_contrast_change(shift):
    """Lower contrast is an affine change of the first conv's output per channel, which the first batch
    norm undoes once its statistics are those of the shifted images: a strong, reliable effect."""
    assert shift["diverged_at"] is None and shift["clean_test_acc"] > 0.8
    contrast = shift["shifts"]["contrast"]
    assert contrast["statistics"] > contrast["source"] + 0.3
    for s in shift["shifts"].values():
        assert all(0.0 <= s[a] <= 1.0 for a in batch_semantics.ADAPTATIONS)
        assert s["entropy_after"] < s["entropy_before"]  # the TENT steps lowered what they minimize
    assert list(shift["shifts"]) == ["contrast", "noise"]


def results_with(small: dict | None = None, shift: dict | None = None) -> dict:
    results: dict = {"summary": {}}
    if small is not None:
        results["small_batch"] = small
        results["summary"]["small_batch"] = batch_semantics.summarize_small_batches(small)
    if shift is not None:
        results["shift"] = shift
    return results


def small_result(accs: dict[str, list]) -> dict:
    """A small-batch result at batch 2 and 8, the given per-seed accuracies at 2, 0.95 at 8."""
    seeds = len(next(iter(accs.values())))
    return {"examples": 100, "batch_sizes": [2, 8], "seeds": list(range(seeds)), "methods": list(accs),
            "test_acc": {m: {"2": v, "8": [0.95] * seeds} for m, v in accs.items()}}  # fmt: skip


def test_the_small_batch_sentence_weighs_gains_against_the_seeds():
    clear = small_result({"bn": [0.5, 0.6], "renorm": [0.8, 0.85], "ghost": [0.6, 0.7], "precise": [0.5, 0.6]})
    line = batch_semantics_report.findings(results_with(clear))[0]
    assert "at batch 2: Batch Renorm 82.5%, ghost batches 65.0%, precise statistics 55.0%" in line
    assert "Batch Renorm gains the most over BN, +27.5 points, more than the seeds of either differ (10.0" in line
    noisy = small_result({"bn": [0.5, 0.7], "renorm": [0.55, 0.75], "ghost": [0.5, 0.6], "precise": [0.5, 0.6]})
    assert "within how much the seeds differ (20.0 points)" in batch_semantics_report.findings(results_with(noisy))[0]
    worse = small_result({"bn": [0.7, 0.7], "renorm": [0.6, 0.6], "ghost": [0.5, 0.5], "precise": [0.65, 0.65]})
    assert "none beats BN there (the best, precise statistics, is -5.0 points)" in batch_semantics_report.findings(
        results_with(worse))[0]  # fmt: skip
    diverged = small_result({"bn": [0.5, 0.6], "renorm": [None, 0.9], "ghost": [0.7, 0.75], "precise": [0.5, 0.6]})
    line = batch_semantics_report.findings(results_with(diverged))[0]
    assert "Batch Renorm diverged (a seed), ghost batches 72.5%" in line  # a diverged seed: no mean
    assert "ghost batches gains the most over BN, +17.5 points" in line


def test_the_shift_sentence_and_tables_come_from_the_numbers():
    shift = {"diverged_at": None, "clean_test_acc": 0.98, "shifts": {
        "noise": {"source": 0.7, "statistics": 0.75, "affine": 0.74},
        "contrast": {"source": 0.2, "statistics": 0.9, "affine": 0.95}}}  # fmt: skip
    line = batch_semantics_report.findings(results_with(shift=shift))[0]
    assert "noise 70.0% -> 75.0% -> 74.0%, contrast 20.0% -> 90.0% -> 95.0%" in line
    assert "most on contrast (+70.0 points) and least on noise (+5.0 points)" in line
    assert "by a further -1.0 to +5.0 points" in line
    text = "\n".join(batch_semantics_report.text_tables(results_with(shift=shift)))
    assert "Distribution shift" in text and "contrast" in text and "95.0%" in text
    diverged = {"diverged_at": 7, "clean_test_acc": None, "shifts": {}}
    assert batch_semantics_report.findings(results_with(shift=diverged)) == [
        "Distribution shift: the CNN diverged at step 7; nothing to adapt."]  # fmt: skip
    assert batch_semantics_report.tables(results_with(shift=diverged)) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"small_batch_sizes": (1, 4)}, "small batch sizes must be at least 2"),
        ({"small_batch_sizes": (2, 64)}, "ghost-batch (32) must be at least the largest small batch size"),
        ({"shifts": ("blur",)}, "shifts must be some of noise, contrast, translate"),
        ({"tent_steps": 0}, "tent-steps must be positive"),
        ({"skip": ("mlp",)}, "only cnn, sweep, small-batch, shift, smoothness, noisy-bn"),
    ],
)
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config(**overrides).validate()


def test_skip_leaves_the_parts_out_of_the_work():
    assert set(Config().work()) == {"mlp", *PARTS}
    assert set(Config(skip=("small-batch", "shift")).work()) == {"mlp", *PARTS} - {"small-batch", "shift"}
    cfg = small_config()
    assert cfg.work()["small-batch"] == 2 * (400 + 100) + 2 * 50  # bn and renorm at 2 and 8, the ghosts; precise: 0
