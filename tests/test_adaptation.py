"""Test-time adaptation: AdaBN's statistics undo a shift of a layer's input exactly; TENT's
step equals a hand-written entropy-minimization step of γ and β; on a shifted task the
adapted model recovers the accuracy it lost."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.adaptation import entropy
from tests.helpers import assert_close


@pytest.mark.parametrize("bn_cls", [batchnorm.BatchNorm1d, nn.BatchNorm1d])
def test_adapted_statistics_undo_a_shift_of_the_input_exactly(bn_cls):
    torch.manual_seed(0)
    # eps ~ 0: (x - mean) / sqrt(var + eps) is then invariant to x -> a x + b (to rounding)
    model = nn.Sequential(bn_cls(6, eps=1e-14), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    source = [torch.randn(n, 6, dtype=torch.float64) * 2 + 1 for n in (10, 7, 12)]
    batchnorm.precise_statistics(model, source)
    scale, shift = torch.linspace(0.3, 3.0, 6, dtype=torch.float64), torch.linspace(-4, 4, 6, dtype=torch.float64)
    target = [x * scale + shift for x in source]
    with torch.no_grad():
        on_source = model.eval()(torch.cat(source))
        assert not torch.allclose(model(torch.cat(target)), on_source, atol=1e-3)
        assert batchnorm.adapt(model, target) == {}
        assert_close(model(torch.cat(target)), on_source, 1e-10, 1e-10, "adapted logits")
    assert not model.training


def test_affine_adaptation_is_tents_entropy_step_on_gamma_and_beta_only():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), batchnorm.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4))
    model = model.double().eval()
    frozen_weight = model[0].weight.detach().clone()
    batch = torch.randn(16, 5, dtype=torch.float64)
    # by hand: batch statistics, the entropy's gradient in γ and β, one SGD step
    reference = copy.deepcopy(model)
    for layer in (reference[1], reference[4]):
        layer.train().track_running_stats = False
    bn_params = [p for m in (reference[1], reference[4]) for p in (m.weight, m.bias)]
    grads = torch.autograd.grad(entropy(reference(batch)), bn_params)
    expected = [p.detach() - 0.5 * g for p, g in zip(bn_params, grads, strict=True)]
    report = batchnorm.adapt(model, [batch], affine=True, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    got = [p.detach() for m in (model[1], model[4]) for p in (m.weight, m.bias)]
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e, 1e-12, 1e-12, "γ/β after one step")
    assert torch.equal(model[0].weight, frozen_weight) and model[0].weight.grad is None
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert report["entropy_after"] < report["entropy_before"]


def _task(n, gen, shift=None):
    """Two Gaussian classes in 8 dimensions; ``shift``: (scale, offset) of the features."""
    labels = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen) + (labels[:, None] * 2 - 1) * 1.2
    if shift is not None:
        x = x * shift[0] + shift[1]
    return x, labels


def test_adaptation_recovers_the_accuracy_lost_to_a_distribution_shift():
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(8, 16), batchnorm.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(150):
        x, y = _task(64, gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model.train()(x), y).backward()
        optimizer.step()
    shift = (torch.linspace(0.5, 2.5, 8), torch.full((8,), 2.5))  # both classes moved across the boundary
    test_x, test_y = _task(2000, gen)
    shifted_x = test_x * shift[0] + shift[1]

    def accuracy(m, x):
        with torch.no_grad():
            return float((m.eval()(x).argmax(1) == test_y).float().mean())

    source, before = accuracy(model, test_x), accuracy(model, shifted_x)
    unlabeled = [_task(64, gen, shift)[0] for _ in range(20)]
    statistics = copy.deepcopy(model)
    batchnorm.adapt(statistics, unlabeled)
    tent = copy.deepcopy(model)
    batchnorm.adapt(tent, unlabeled, affine=True, steps=2)
    after_statistics, after_tent = accuracy(statistics, shifted_x), accuracy(tent, shifted_x)
    assert source > 0.9 and before < source - 0.1, (source, before)
    assert after_statistics > before + 0.05 and after_tent > before + 0.05, (before, after_statistics, after_tent)


def test_adapt_refuses_a_model_without_batch_norm_and_a_bad_step_count():
    with pytest.raises(ValueError, match="no batch-norm layer"):
        batchnorm.adapt(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        batchnorm.adapt(nn.BatchNorm1d(2), [torch.randn(3, 2)], affine=True, steps=0)
