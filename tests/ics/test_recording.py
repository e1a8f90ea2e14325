"""batchnorm.ics.recording: the input recorder against NumPy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm.ics import InputRecorder, gradient_ics, plot_ics, plot_percentiles


def test_recorder_statistics_match_numpy(gen):
    probe = nn.Identity()
    model = nn.Sequential(probe, nn.Flatten())
    rec = InputRecorder({"probe": probe}, unit=2, percentiles=(15, 50, 85))
    x = torch.randn(6, 4, 3, 5, generator=gen) * 3 + 1  # B,C,H,W: statistics per channel
    rec.record(10, model, x)
    h = rec.history["probe"]
    values = x.numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(4, -1)  # C, B*H*W
    assert h.steps == [10] and h.count == [6 * 3 * 5]
    np.testing.assert_allclose(h.mean[0], values.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(h.std[0], values.std(axis=1), rtol=1e-12)
    np.testing.assert_allclose(h.percentiles[0], np.percentile(values[2], [15, 50, 85]), rtol=1e-12)


def test_recorder_pools_forwards_and_ignores_unrecorded_ones(gen):
    probe = nn.Identity()
    rec = InputRecorder({"p": probe})
    a, b = torch.randn(5, 3, generator=gen), torch.randn(7, 3, generator=gen)
    probe(torch.randn(4, 3, generator=gen))  # outside recording: not kept
    with rec.recording(1):
        probe(a)
        probe(b)
    h = rec.history["p"]
    assert h.steps == [1] and h.count == [12]
    np.testing.assert_allclose(h.mean[0], torch.cat([a, b]).double().mean(0).numpy(), rtol=1e-12)
    with pytest.raises(RuntimeError, match="nested"), rec.recording(2), rec.recording(3):
        pass
    rec.detach()
    with rec.recording(4):
        probe(a)
    assert rec.history["p"].steps == [1]


def test_recorder_drift_by_hand():
    probe = nn.Identity()
    rec = InputRecorder({"p": probe})
    # feature 0 shifts by +2 then +1; feature 1 keeps its mean, its std doubles then stays
    for step, batch in ((0, [[0.0, -1.0], [0.0, 1.0]]), (5, [[2.0, -2.0], [2.0, 2.0]]), (9, [[3.0, -2.0], [3.0, 2.0]])):
        rec.record(step, probe, torch.tensor(batch))
    d = rec.drift("p")
    np.testing.assert_allclose(d["steps"], [0, 5, 9])
    np.testing.assert_allclose(d["mean_shift"], [0.0, math.sqrt(4 / 2), math.sqrt(1 / 2)])
    np.testing.assert_allclose(d["std_shift"], [0.0, math.sqrt(1 / 2), 0.0])
    first = rec.drift("p", against="first")
    np.testing.assert_allclose(first["mean_shift"], [0.0, math.sqrt(4 / 2), math.sqrt(9 / 2)])
    exported = json.loads(json.dumps(rec.to_dict()))
    assert exported["layers"]["p"]["steps"] == [0, 5, 9]
    assert exported["layers"]["p"]["drift_mean_shift"] == pytest.approx(list(d["mean_shift"]))


def test_recorder_saves_json_and_plots(tmp_path, gen):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid())
    rec = InputRecorder({"act": model[1]})
    for step in range(3):
        rec.record(step, model, torch.randn(20, 3, generator=gen))
    rec.save_json(tmp_path / "inputs.json")
    assert json.loads((tmp_path / "inputs.json").read_text())["percentiles"] == [15.0, 50.0, 85.0]
    ax = plot_percentiles(rec, "act")
    assert len(ax.lines) == 3 and ax.lines[0].get_xdata().tolist() == [0, 1, 2]
    ics = [gradient_ics(model, lambda o, t: ((o - t) ** 2).sum(), torch.randn(5, 3), torch.rand(5, 4), lr=0.1)]
    axes = plot_ics([1], ics)
    assert len(axes[0].lines) == 1
    plt.close("all")


def test_recorder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        InputRecorder({})
    with pytest.raises(ValueError, match="percentiles"):
        InputRecorder({"p": nn.Identity()}, percentiles=(50, 150))
    probe = nn.Identity()
    rec = InputRecorder({"p": probe}, unit=5)
    with pytest.raises(IndexError, match="unit 5"):
        rec.record(0, probe, torch.zeros(3, 2))
