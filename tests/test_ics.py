"""batchnorm.ics: the input recorder against NumPy, and the gradient ICS against hand-derived G and G'."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.ics import InputRecorder, gradient_ics, plot_ics, plot_percentiles


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum()


# --- gradient ICS -----------------------------------------------------------------


def scalar_chain(w1: float, b1: float, w2: float, b2: float) -> nn.Sequential:
    """out = w2 * (w1 * x + b1) + b2, every weight a scalar."""
    model = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1)).double()
    with torch.no_grad():
        for p, v in zip(model.parameters(), (w1, b1, w2, b2), strict=True):
            p.fill_(v)
    return model


def test_gradient_ics_matches_hand_derivation():
    w1, b1, w2, b2, lr = 0.7, -0.2, 1.3, 0.4, 0.05
    xs, ys = [0.5, -1.5, 2.0], [1.0, 0.3, -0.8]
    model = scalar_chain(w1, b1, w2, b2)
    x = torch.tensor(xs, dtype=torch.float64)[:, None]
    y = torch.tensor(ys, dtype=torch.float64)[:, None]

    # by hand: r_b = out_b - y_b; dL/dw1 = sum r w2 x, dL/db1 = sum r w2, dL/dw2 = sum r h
    def residuals(w1, b1):
        return [(w2 * (w1 * xb + b1) + b2) - yb for xb, yb in zip(xs, ys, strict=True)]

    r = residuals(w1, b1)
    g1 = sum(rb * w2 * xb for rb, xb in zip(r, xs, strict=True))
    g1_bias = sum(rb * w2 for rb in r)
    g2 = sum(rb * (w1 * xb + b1) for rb, xb in zip(r, xs, strict=True))
    # layer 2 after layer 1 (weight and bias, not layer 2's own bias) took its SGD step
    w1n, b1n = w1 - lr * g1, b1 - lr * g1_bias
    g2_shift = sum(rb * (w1n * xb + b1n) for rb, xb in zip(residuals(w1n, b1n), xs, strict=True))

    first, second = gradient_ics(model, half_squared_error, x, y, lr=lr)
    assert (first.name, second.name) == ("0", "1")
    assert first.grad_norm == pytest.approx(abs(g1), rel=1e-12)
    assert first.diff_norm == 0.0 and first.cosine == pytest.approx(1.0)
    assert second.grad_norm == pytest.approx(abs(g2), rel=1e-12)
    assert second.shifted_grad_norm == pytest.approx(abs(g2_shift), rel=1e-12)
    assert second.diff_norm == pytest.approx(abs(g2 - g2_shift), rel=1e-10)
    assert second.cosine == pytest.approx(math.copysign(1.0, g2 * g2_shift))
    assert second.diff_norm > 1e-3  # the example is not degenerate


def test_gradient_ics_vector_layers_against_manual_autograd(gen):
    # a 3-layer net with BN: recompute G' with autograd on a hand-stepped copy
    model = nn.Sequential(
        nn.Linear(5, 4), batchnorm.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)
    )
    model = model.double()
    x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(8, 2, generator=gen, dtype=torch.float64)
    lr = 0.3
    result = gradient_ics(model, half_squared_error, x, y, lr=lr, layers={"a": model[0], "b": model[3], "c": model[5]})

    params = list(model.parameters())
    grads = torch.autograd.grad(half_squared_error(model(x), y), params)
    for res, layer in zip(result, (model[0], model[3], model[5]), strict=True):
        k = next(i for i, p in enumerate(params) if p is layer.weight)
        clone = [p.detach().clone() for p in params]
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for j, p in enumerate(shifted.parameters()):
                p.copy_(clone[j] - lr * grads[j] if j < k else clone[j])
        g_shift = torch.autograd.grad(half_squared_error(shifted(x), y), list(shifted.parameters())[k])[0]
        g = grads[k]
        assert res.grad_norm == pytest.approx(g.norm().item(), rel=1e-10)
        assert res.diff_norm == pytest.approx((g - g_shift).norm().item(), rel=1e-8, abs=1e-14)
        expected_cos = (g.flatten() @ g_shift.flatten() / (g.norm() * g_shift.norm())).item()
        assert res.cosine == pytest.approx(expected_cos, rel=1e-10)
    assert result[0].diff_norm == 0.0
    assert result[1].diff_norm > 0 and result[2].diff_norm > 0


def test_gradient_ics_leaves_model_untouched(gen):
    model = nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(10, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    model(x)  # move the running statistics away from their initial values
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gradient_ics(model, nn.functional.cross_entropy, x, y, lr=0.5)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert model.training


def test_gradient_ics_next_params_equals_sgd(gen):
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 2)).double()
    x, y = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (6,), generator=gen)
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    stepped = {p: p.detach() - 0.2 * g for p, g in zip(params, grads, strict=True)}
    by_lr = gradient_ics(model, nn.functional.cross_entropy, x, y, lr=0.2)
    by_values = gradient_ics(model, nn.functional.cross_entropy, x, y, next_params=stepped)
    for a, b in zip(by_lr, by_values, strict=True):
        assert a.diff_norm == pytest.approx(b.diff_norm, rel=1e-12)
        assert a.cosine == pytest.approx(b.cosine, rel=1e-12)


def test_gradient_ics_rejects_bad_calls():
    model = nn.Sequential(nn.Linear(2, 2))
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    with pytest.raises(ValueError, match="exactly one"):
        gradient_ics(model, half_squared_error, x, y)
    with pytest.raises(ValueError, match="no trainable weight"):
        gradient_ics(model, half_squared_error, x, y, lr=0.1, layers={"act": nn.ReLU()})


# --- input recorder ---------------------------------------------------------------


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


# --- loss landscape (Santurkar et al. 2018, Figure 4) -------------------------------------


class Quadratic(nn.Module):
    """``L(theta) = theta^T H theta / 2`` through a loss on the module's output, theta the parameter."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone())

    def forward(self, x):
        return self.theta


def _quadratic_loss(h: torch.Tensor):
    return lambda out, target: 0.5 * out @ h @ out


def _spd(gen: torch.Generator, n: int = 5) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    return q @ torch.diag(torch.tensor([4.0, 2.5, 1.0, 0.5, 0.1], dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_landscape_on_a_quadratic_has_its_closed_forms(gen):
    """Along g = H theta: L(theta - eta g) = L - eta g.g + eta^2 g.Hg / 2, the gradient changes by
    eta ||Hg||, so the effective beta-smoothness is ||Hg|| / ||g||, at most the largest eigenvalue."""
    h = _spd(gen)
    theta = torch.randn(5, dtype=torch.float64, generator=gen)
    etas = [0.01, 0.05, 0.1, 0.3, 0.6]
    probe = batchnorm.ics.loss_landscape(Quadratic(theta), _quadratic_loss(h), torch.zeros(1), torch.zeros(1), etas)
    g = h @ theta
    loss = 0.5 * theta @ h @ theta
    expected = [float(loss - eta * g @ g + 0.5 * eta**2 * g @ h @ g) for eta in etas]
    np.testing.assert_allclose(probe.losses, expected, rtol=1e-12)
    np.testing.assert_allclose(probe.gradient_changes, [eta * float((h @ g).norm()) for eta in etas], rtol=1e-12)
    assert probe.loss_range == pytest.approx(max([float(loss), *expected]) - min([float(loss), *expected]), rel=1e-12)
    assert probe.gradient_predictiveness == pytest.approx(0.6 * float((h @ g).norm()), rel=1e-12)
    ratio = float((h @ g).norm() / g.norm())
    assert probe.beta_smoothness == pytest.approx(ratio, rel=1e-12) and ratio <= 4.0 + 1e-9


@pytest.mark.parametrize("seed", [2])
def test_loss_landscape_beta_smoothness_is_the_largest_eigenvalue_along_its_eigenvector(gen):
    h = _spd(gen)
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    theta = 3.0 * eigenvectors[:, -1]  # the gradient then points along the top eigenvector
    probe = batchnorm.ics.loss_landscape(Quadratic(theta), _quadratic_loss(h), torch.zeros(1), torch.zeros(1),
                                         [0.05, 0.2])  # fmt: skip
    assert probe.beta_smoothness == pytest.approx(float(eigenvalues[-1]), rel=1e-10)


@pytest.mark.parametrize("seed", [3])
def test_loss_landscape_leaves_the_model_as_it_was(gen):
    model = nn.Sequential(nn.Linear(4, 6), batchnorm.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    probe = batchnorm.ics.loss_landscape(model, nn.functional.cross_entropy, x, y, [0.1, 1.0])
    assert model.training and len(probe.losses) == 2 and probe.grad_norm > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    with pytest.raises(ValueError, match="positive, finite step sizes"):
        batchnorm.ics.loss_landscape(model, nn.functional.cross_entropy, x, y, [0.1, -1.0])
