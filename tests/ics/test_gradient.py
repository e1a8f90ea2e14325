"""batchnorm.ics.gradient: the gradient ICS against hand-derived G and G'."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.ics import gradient_ics


def half_squared_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - target) ** 2).sum()


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
