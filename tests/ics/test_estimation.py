"""batchnorm.ics.estimation: the running statistics' error against closed forms (NumPy float64)
and the empirical output difference, and the batch/population mode gap against hand-computed
normalizations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.ics import mode_gap, statistics_error

SIZES = (5, 11, 3, 9)  # uneven batches: the population weighs each value once


def _data(gen, sizes=SIZES, channels=4, extra=()):
    scale = torch.tensor([0.5, 2.0, 3.0, 0.05])[:channels].view(1, -1, *([1] * len(extra)))
    return [(torch.randn(n, channels, *extra, generator=gen, dtype=torch.float64) * scale + 1.5) for n in sizes]


def _moments(batches):
    x = np.concatenate([b.numpy() for b in batches])
    x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return x.mean(1), x.var(1)  # the population's: biased


def _set_running(layer, gen):
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen) + 1.5)
        layer.running_var.copy_(torch.rand(layer.num_features, generator=gen) * 4 + 0.01)


@pytest.mark.parametrize("layer_cls", [nn.BatchNorm1d, batchnorm.BatchNorm1d])
def test_statistics_error_has_its_closed_forms(layer_cls, gen):
    layer = layer_cls(4, eps=0.1).double()
    _set_running(layer, gen)
    batches = _data(gen)
    (err,) = statistics_error(layer, batches)
    mu, var = _moments(batches)
    r, s = layer.running_mean.numpy(), layer.running_var.numpy()
    true_std, run_std = np.sqrt(var + 0.1), np.sqrt(s + 0.1)
    assert err.name == "" and err.count == sum(SIZES)
    assert err.mean_error == pytest.approx(np.sqrt(np.mean(((r - mu) / true_std) ** 2)), rel=1e-10)
    assert err.std_error == pytest.approx(np.sqrt(np.mean((run_std / true_std - 1) ** 2)), rel=1e-10)
    output = (mu - r) ** 2 / (s + 0.1) + var * (1 / run_std - 1 / true_std) ** 2
    assert err.output_error == pytest.approx(np.sqrt(np.mean(output)), rel=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layer_cls", [nn.BatchNorm2d, batchnorm.BatchNorm2d])
def test_output_error_is_the_rms_difference_of_the_normalized_outputs(layer_cls, channels_last, gen):
    """Over the population, eval mode with the running statistics against eval mode with the true moments:
    the RMS of the difference of the layer's normalized outputs is ``output_error``, exactly."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer_cls(4, eps=1e-3)).double()
    _set_running(model[1], gen)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
    images = [torch.randn(n, 3, 7, 6, generator=gen, dtype=torch.float64) for n in (4, 7)]
    if channels_last:
        images = [x.to(memory_format=torch.channels_last) for x in images]
    (err,) = statistics_error(model.eval(), images)
    with torch.no_grad():
        x = model[0](torch.cat(images))
        mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)
        view = (1, -1, 1, 1)
        ours = (x - model[1].running_mean.view(view)) / torch.sqrt(model[1].running_var.view(view) + 1e-3)
        true = (x - mu.view(view)) / torch.sqrt(var.view(view) + 1e-3)
    assert err.count == x.numel() // 4
    assert err.output_error == pytest.approx(float((ours - true).pow(2).mean().sqrt()), rel=1e-9)


def test_after_precise_statistics_only_the_unbiased_variance_is_left(gen):
    """precise_statistics over the same data stores its mean (no error) and its unbiased variance:
    the std error is then sqrt((var n/(n-1) + eps)/(var + eps)) - 1 per channel."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    data = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in SIZES]
    batchnorm.precise_statistics(model, data)
    first, second = statistics_error(model, data)
    n = sum(SIZES)
    assert (first.name, second.name) == ("1", "4")
    for err, layer in ((first, model[1]), (second, model[4])):
        var = layer.running_var.numpy() * (n - 1) / n
        expected = np.sqrt(np.mean((np.sqrt((var * n / (n - 1) + layer.eps) / (var + layer.eps)) - 1) ** 2))
        assert err.mean_error < 1e-12
        assert err.std_error == pytest.approx(expected, rel=1e-8)


def test_statistics_error_leaves_the_model_as_it_was(gen):
    model = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4), nn.Dropout(0.5)).double()
    _set_running(model[1], gen)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    statistics_error(model, [torch.randn(6, 3, generator=gen, dtype=torch.float64)])
    assert not model.training and not model[1].training and model[1].track_running_stats
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_statistics_error_skips_a_layer_that_saw_nothing_and_refuses_a_model_without_one(gen):
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    assert [e.name for e in statistics_error(Branch(), [torch.randn(4, 2, generator=gen)])] == ["used"]
    with pytest.raises(ValueError, match="no batch-norm layer"):
        statistics_error(nn.Linear(2, 2), [torch.randn(4, 2)])


def _mean_square(out, target):
    return out.pow(2).mean()


@pytest.mark.parametrize("layer_cls", [nn.BatchNorm1d, batchnorm.BatchNorm1d])
def test_mode_gap_has_its_closed_forms(layer_cls, gen):
    """Mean square of the normalized output (no affine): with batch statistics each batch's is var/(var + eps)
    per channel; with population statistics the mean of (x - r)^2/(s + eps)."""
    layer = layer_cls(4, eps=0.05, affine=False).double()
    _set_running(layer, gen)
    x = _data(gen, sizes=(23,))[0]
    gap = mode_gap(layer, _mean_square, x, torch.zeros(23), batch_size=5)
    kept = x[:20].numpy().reshape(4, 5, 4)  # 4 batches of 5, 3 samples dropped
    batch_var = kept.var(axis=1)
    r, s = layer.running_mean.numpy(), layer.running_var.numpy()
    assert (gap.batch_size, gap.samples) == (5, 20)
    assert gap.batch_statistics == pytest.approx(np.mean(batch_var / (batch_var + 0.05)), rel=1e-10)
    assert gap.population_statistics == pytest.approx(np.mean((x[:20].numpy() - r) ** 2 / (s + 0.05)), rel=1e-10)
    assert gap.gap == pytest.approx(gap.batch_statistics - gap.population_statistics)
    assert gap.as_dict()["gap"] == gap.gap


def test_mode_gap_follows_the_layers_own_training_forward(gen):
    """A ghost layer (virtual batches of 4) at batch 8 normalizes like the plain layer at batch 4."""
    plain = batchnorm.BatchNorm1d(4).double()
    _set_running(plain, gen)
    ghost = batchnorm.BatchNorm1d(4, virtual_batch_size=4).double()
    ghost.load_state_dict(plain.state_dict())
    x = _data(gen, sizes=(32,))[0]
    assert mode_gap(ghost, _mean_square, x, x, 8).batch_statistics == pytest.approx(
        mode_gap(plain, _mean_square, x, x, 4).batch_statistics, rel=1e-12)  # fmt: skip


def test_mode_gap_runs_the_rest_in_eval_and_leaves_the_model_as_it_was(gen):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).double()
    _set_running(model[1], gen)
    x = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    before = copy.deepcopy(model.state_dict())
    first = mode_gap(model, _mean_square, x, x, 4)
    assert first == mode_gap(model, _mean_square, x, x, 4)  # no dropout: deterministic
    assert model.training and model[1].training and model[1].track_running_stats
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_mode_gap_rejects_bad_calls():
    layer = nn.BatchNorm1d(2)
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="at least 2"):
        mode_gap(layer, _mean_square, x, x, 1)
    with pytest.raises(ValueError, match="6 inputs but 5 targets"):
        mode_gap(layer, _mean_square, x, x[:5], 2)
    with pytest.raises(ValueError, match="make no batch of 8"):
        mode_gap(layer, _mean_square, x, x, 8)
    with pytest.raises(ValueError, match="no batch-norm layer"):
        mode_gap(nn.Linear(2, 2), _mean_square, x, x, 2)
