"""The demo's smoothness and noisy-BN parts: what they record (on small, fast configurations), the noise
module's train/eval behaviour, ``--skip``, the report's sections, and the sentences drawn from the numbers."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from batchnorm.experiments import report, smoothness, smoothness_report
from batchnorm.experiments.experiment import Config

pytestmark = pytest.mark.usefixtures("one_thread")  # the demo runs digits on one thread


def small_config(**overrides) -> Config:
    base = dict(mlp_steps=60, eval_every=20, hidden=(32, 32), smoothness_points=3)
    base.update(overrides)
    return Config(**base)


@pytest.fixture(scope="module")
def smooth(digits):
    return smoothness.run_smoothness(digits, small_config(smoothness_seeds=1))


@pytest.fixture(scope="module")
def smooth2(digits):
    return smoothness.run_smoothness(digits, small_config(smoothness_seeds=2))


@pytest.fixture(scope="module")
def noisy(digits):
    return smoothness.run_noisy_bn(digits, small_config())


def test_smoothness_records_every_measure_at_every_probe(smooth):
    assert smooth["probe_steps"] == [1, 31, 60] and smooth["step_sizes"] == [0.75, 1.5, 3.0, 6.0, 12.0]
    assert smooth["seeds"] == [0]
    for arm in ("plain", "bn"):
        (a,) = smooth["arms"][arm]["runs"]
        assert a["probe_steps"] == [1, 31, 60] and len(a["probes"]) == 3
        for probe in a["probes"]:
            assert len(probe["losses"]) == len(probe["gradient_changes"]) == 5
        for name in smoothness.SMOOTHNESS_MEASURES:
            assert len(a[name]) == 3 and all(math.isfinite(v) and v >= 0 for v in a[name])
    summary = smoothness.summarize_smoothness(smooth)
    assert summary["probes_compared"] == 3 and summary["seeds"] == 1
    assert 0 <= summary["loss_range"]["bn_smaller_at"] <= 3


def test_every_seed_is_recorded_and_each_is_a_one_seed_run(digits, smooth, smooth2):
    assert smooth2["seeds"] == [0, 1]
    for arm in ("plain", "bn"):
        runs = smooth2["arms"][arm]["runs"]
        assert len(runs) == 2 and all(run["probe_steps"] == [1, 31, 60] for run in runs)
        assert runs[0]["probes"] != runs[1]["probes"]  # another initialization, batch order and probe batch
        assert runs[0] == smooth["arms"][arm]["runs"][0]  # seed 0: the one-seed run
    alone = smoothness.run_smoothness(digits, small_config(smoothness_seeds=1, seed=1))
    assert alone["seeds"] == [1]
    for arm in ("plain", "bn"):
        assert smooth2["arms"][arm]["runs"][1] == alone["arms"][arm]["runs"][0]  # the same probes, exactly
    summary = smoothness.summarize_smoothness(smooth2)
    assert summary["probes_compared"] == 6 and summary["seeds"] == 2


def test_the_work_counts_every_seed(digits):
    cfg = small_config(smoothness_seeds=2, mlp_steps=20, smoothness_points=2)
    assert smoothness.smoothness_work(cfg) == 2 * 2 * 20
    done = []
    smoothness.run_smoothness(digits, cfg, progress=done.append)
    assert sum(done) == smoothness.smoothness_work(cfg)


def test_probing_does_not_change_training(digits, smooth):
    """The BN arm with probes ends where one trained without probes does (loss_landscape restores the model)."""
    from batchnorm.experiments import models, training

    cfg = small_config()
    model = models.mlp(64, 10, bn=True, hidden=cfg.hidden, init_std=cfg.init_std, seed=cfg.seed)
    tensors = [torch.from_numpy(a) for a in (digits.x_train, digits.y_train, digits.x_test, digits.y_test)]
    history = training.train(model, *tensors, steps=cfg.mlp_steps, lr=cfg.mlp_lr, batch_size=cfg.batch_size,
                             seed=cfg.seed, eval_every=cfg.eval_every)  # fmt: skip
    assert history.test_acc == smooth["arms"]["bn"]["runs"][0]["test_acc"]


def test_probe_steps_are_evenly_spaced_from_first_to_last():
    assert smoothness.probe_steps(2000, 8) == [1, 287, 572, 858, 1143, 1429, 1714, 2000]
    assert smoothness.probe_steps(10, 1) == [1]


def test_noise_is_identity_in_eval_and_moves_each_unit_in_training():
    noise = smoothness.NoisyShift(4, spread=0.5, shift_std=1.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 4)
    assert torch.equal(noise.eval()(x), x)
    noise.train()
    first, second = noise(x), noise(x)
    assert not torch.allclose(first, x) and not torch.allclose(first, second)  # drawn anew every call
    # one scale and shift per unit for the whole batch: each unit's values move by one affine map
    scale = (first[1] - first[0]) / (x[1] - x[0])
    assert torch.allclose((first - x * scale) - (first - x * scale)[0], torch.zeros(8, 4), atol=1e-5)
    assert ((scale > 0.5 - 1e-5) & (scale < 1.5 + 1e-5)).all()
    again = smoothness.NoisyShift(4, spread=0.5, shift_std=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(x), first)  # the generator fixes the draws


def test_noisy_bn_records_curves_and_instability(noisy):
    assert set(noisy["arms"]) == {"plain", "bn", "noisy"} and noisy["layer"] == "hidden2"
    for a in noisy["arms"].values():
        assert a["steps"] == [0, 20, 40, 60] and all(0 <= v <= 1 for v in a["test_acc"])
        assert all(v is not None and math.isfinite(v) and v >= 0 for v in a["instability"].values())
        assert len(a["unit_mean_trace"]["values"]) == 60
    inst = {arm: a["instability"]["mean_step_change"] for arm, a in noisy["arms"].items()}
    # what the part exists to show: with noise the sigmoid's input moves far more than with BN alone
    assert inst["noisy"] > 5 * inst["bn"]


def test_instability_of_a_still_distribution_is_zero():
    means = torch.ones(5, 3).numpy()
    assert smoothness.instability(means, means) == {"mean_step_change": 0.0, "std_step_change": 0.0,
                                                    "mean_spread": 0.0}  # fmt: skip
    assert smoothness.instability(means[:1], means[:1])["mean_step_change"] is None


def smoothness_result(plain: list[list[float]], bn: list[list[float]], steps=(1, 50, 100)) -> dict:
    """A two-arm result, one run per seed (one list of values per seed, per probe), whose three measures all take
    the given values; a shorter list is a run that stopped (diverged) before its later probes."""

    def run(values):
        return {"probe_steps": list(steps[: len(values)]), "probes": [{}] * len(values),
                **{m: values for m in smoothness.SMOOTHNESS_MEASURES}}  # fmt: skip

    arms = {arm: {"runs": [run(v) for v in per_seed]} for arm, per_seed in (("plain", plain), ("bn", bn))}
    return {"lr": 3.0, "probe_steps": list(steps), "step_sizes": [0.75, 3.0, 12.0], "seeds": list(range(len(plain))),
            "arms": arms}  # fmt: skip


def test_the_summary_compares_probe_by_probe_and_seed_by_seed():
    r = smoothness_result(plain=[[1.0, 2.0, 3.0], [10.0, 20.0]], bn=[[0.5, 4.0, 1.0], [1.0, 40.0, 7.0]])
    s = smoothness.summarize_smoothness(r)
    # pairs: seed 0 at steps 1, 50, 100; seed 1 at steps 1, 50 (its plain run stopped before step 100)
    assert s["seeds"] == 2 and s["probes_compared"] == 5
    for m in smoothness.SMOOTHNESS_MEASURES:
        assert s[m]["bn_smaller_at"] == 3  # (0.5 < 1), (1 < 3), (1 < 10); not (4 > 2), (40 > 20)
        assert s[m]["median_plain"] == 3.0  # of 1, 2, 3, 10, 20
        assert s[m]["median_bn"] == 1.0  # of 0.5, 4, 1, 1, 40 (BN's seed-1 probe at 100 has no partner)
        assert s[m]["median_ratio_plain_over_bn"] == 2.0  # of 2, 0.5, 3, 10, 0.5
    assert smoothness.smoothness_pairs(r) == [(0, 1, 0, 0), (0, 50, 1, 1), (0, 100, 2, 2), (1, 1, 0, 0), (1, 50, 1, 1)]
    none = smoothness.summarize_smoothness(smoothness_result(plain=[[]], bn=[[1.0]]))
    assert none["probes_compared"] == 0 and none["loss_range"]["median_bn"] is None


def test_the_smoothness_sentence_follows_the_numbers():
    smoother = smoothness_result([[1.0, 2.0, 3.0]], [[0.1, 0.2, 4.0]])
    line = smoothness_report.smoothness_sentence(smoother, smoothness.summarize_smoothness(smoother))
    assert "3 probes over 1 seed " in line
    assert "loss range smaller with BN at 2 of 3 probes (median 0.2 with BN, 2 without)" in line
    assert line.endswith("by every measure the loss is smoother with BN, as Santurkar et al. report.")
    rougher = smoothness_result([[0.1, 0.2, 0.3]], [[1.0, 2.0, 0.01]])
    line = smoothness_report.smoothness_sentence(rougher, smoothness.summarize_smoothness(rougher))
    assert "at 1 of 3 probes" in line and line.endswith("by no measure is the loss smoother with BN in this run.")
    mixed = copy.deepcopy(smoother)
    mixed["arms"]["bn"]["runs"][0]["beta_smoothness"] = [5.0, 5.0, 5.0]
    line = smoothness_report.smoothness_sentence(mixed, smoothness.summarize_smoothness(mixed))
    assert "so BN is smoother by loss range and gradient change" in line and "but not by effective β-smoothness" in line
    two = smoothness_result([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [[0.1, 0.2, 4.0], [0.1, 5.0, 4.0]])
    s = smoothness.summarize_smoothness(two)
    line = smoothness_report.smoothness_sentence(two, s)
    assert "6 probes over 2 seeds" in line and "loss range smaller with BN at 3 of 6 probes" in line
    assert line.endswith("by no measure is the loss smoother with BN in this run.")  # 3 of 6 is not most
    title, _, rows = smoothness_report.tables({"smoothness": two, "summary": {"smoothness": s}})[0]
    assert title == "Smoothness along the gradient, 6 probes over 2 seeds" and rows[0][-1] == "3/6"


def test_seed_bands_span_the_seeds():
    def probe(losses, changes, loss=1.0):
        return {"loss": loss, "losses": losses, "gradient_changes": changes, "step_sizes": [1.0, 2.0],
                "grad_norm": 1.0}  # fmt: skip

    runs = [{"probe_steps": [1, 5], "probes": [probe([0.5, 2.0], [1.0, 4.0]), probe([0.2, 0.9], [1.0, 1.0])]},
            {"probe_steps": [1], "probes": [probe([0.1, 3.0], [1.0, 3.0])]}]  # fmt: skip
    steps, bands = smoothness_report.seed_bands(runs, "loss_range")
    assert steps == [1, 5] and bands.tolist() == [[0.1, 2.5, 3.0], [0.2, 1.0, 1.0]]
    steps, bands = smoothness_report.seed_bands(runs, "gradient_predictiveness")
    assert bands.tolist() == [[3.0, 3.5, 4.0], [1.0, 1.0, 1.0]]
    steps, bands = smoothness_report.seed_bands(runs, "beta_smoothness")  # change / (step size * |g|)
    assert bands.tolist() == [[1.5, 1.75, 2.0], [1.0, 1.0, 1.0]]
    assert smoothness_report.seed_bands([{"probe_steps": [], "probes": []}], "loss_range")[0] == []


@pytest.mark.parametrize("seeds", [1, 2])
def test_the_smoothness_figure_draws_for_one_and_more_seeds(smooth, smooth2, seeds, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = smooth if seeds == 1 else smooth2
    fig = smoothness_report._smoothness_figure(plt, r)
    fig.savefig(tmp_path / "smoothness.png", dpi=30)
    lines = [line for line in fig.axes[1].get_lines()]
    assert len(lines) == 2 and list(lines[0].get_xdata()) == r["probe_steps"]
    assert fig.axes[0].get_legend().get_title().get_text() == f"{seeds} seed{'s' if seeds > 1 else ''}"
    plt.close(fig)


def noisy_result(steps: dict[str, int | None], change: dict[str, float]) -> dict:
    arms = {arm: {"steps_to_target": steps[arm], "final_test_acc": 0.9 if steps[arm] else 0.1,
                  "instability": {"mean_step_change": change[arm], "std_step_change": 0.1, "mean_spread": 0.2}}
            for arm in ("plain", "bn", "noisy")}  # fmt: skip
    return {"arms": arms, "noise": {"scale_spread": 0.5, "shift_std": 1.0}, "layer": "hidden3", "target": 0.9}


def test_the_noisy_bn_sentence_follows_the_numbers():
    claim = "so training is still faster than without BN although the noisy network's layer inputs move more"
    fast_unstable = noisy_result({"plain": 1000, "bn": 100, "noisy": 150}, {"plain": 0.5, "bn": 0.01, "noisy": 2.0})
    line = smoothness_report.noisy_bn_sentence(fast_unstable)
    assert claim in line and "noisy BN 150, with BN 100, without BN 1000" in line and "U(0.5, 1.5)" in line
    stable = noisy_result({"plain": 1000, "bn": 100, "noisy": 150}, {"plain": 0.5, "bn": 0.01, "noisy": 0.4})
    line = smoothness_report.noisy_bn_sentence(stable)
    assert claim not in line and "does not test training despite unstable distributions" in line
    slow = noisy_result({"plain": 1000, "bn": 100, "noisy": 1200}, {"plain": 0.5, "bn": 0.01, "noisy": 2.0})
    assert "trains no faster than the one without BN" in smoothness_report.noisy_bn_sentence(slow)
    never = noisy_result({"plain": None, "bn": 100, "noisy": None}, {"plain": 0.5, "bn": 0.01, "noisy": 2.0})
    assert "never reached the target" in smoothness_report.noisy_bn_sentence(never)
    faster_than_never = noisy_result({"plain": None, "bn": 100, "noisy": 300}, {"plain": 0.5, "bn": 0.01, "noisy": 2})
    assert claim in smoothness_report.noisy_bn_sentence(faster_than_never)


def test_report_has_the_sections_tables_and_numbers(smooth2, noisy, tmp_path):
    smooth = smooth2
    results = {"config": {**small_config().__dict__, "hidden": [32, 32]}, "smoothness": smooth, "noisy_bn": noisy,
               "dataset": {"name": "digits", "train": 1, "test": 1, "image_shape": [1, 8, 8], "classes": 10},
               "summary": {"smoothness": smoothness.summarize_smoothness(smooth),
                           "noisy_bn": smoothness.summarize_noisy_bn(noisy)}}  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.savefig(tmp_path / name, dpi=30)
        plt.close(fig)
        return name

    figures = smoothness_report.write_figures(plt, results, save)
    assert figures == ["smoothness.png", "noisy_bn.png"]
    sections = smoothness_report.html_sections(results, lambda name: f"<img {name}>", figures)
    assert "<h2>Smoothness of the loss along the gradient</h2>" in sections and "<img smoothness.png>" in sections
    assert "<h2>Noisy BN" in sections and "<img noisy_bn.png>" in sections
    assert "from each of 2 seeds (0, 1:" in sections and "6 probes over 2 seeds" in sections
    text = "\n".join(smoothness_report.text_tables(results))
    assert "effective β-smoothness" in text and "noisy BN" in text and "6 probes over 2 seeds" in text
    json.dumps(report._clean(results), allow_nan=False)  # strict JSON


def test_skip_names_both_parts():
    assert {"smoothness", "noisy-bn"} <= set(Config().work())
    assert not {"smoothness", "noisy-bn"} & set(Config(skip=("smoothness", "noisy-bn")).work())
    assert "noisy-bn" in Config(skip=("smoothness",)).work()


@pytest.mark.parametrize(("overrides", "message"), [({"smoothness_points": 0}, "smoothness-points must be positive"),
                                                    ({"smoothness_step_factors": ()}, "smoothness step factors"),
                                                    ({"noise_shift_std": -1.0}, "non-negative")])  # fmt: skip
def test_bad_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        Config(**overrides).validate()
