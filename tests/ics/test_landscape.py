"""batchnorm.ics.landscape: the loss probed along the gradient, against a quadratic's closed forms."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm


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
