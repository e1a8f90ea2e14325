"""Population statistics: precise statistics pooled exactly over batches, and one running
update per k micro-batches, against the statistics of the concatenated data (NumPy float64,
and torch's own layer on the big batch)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close

SIZES = (3, 7, 2, 5)  # uneven batches: an average of averages would be wrong


def _batches(sizes, channels=4, extra=(), gen=None):
    return [torch.randn(n, channels, *extra, dtype=torch.float64, generator=gen) * 3 + 1 for n in sizes]


def _exact(batches):
    """(mean, unbiased var) per channel over every value of every batch, NumPy float64."""
    x = np.concatenate([b.numpy() for b in batches])
    x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    return x.mean(1), x.var(1, ddof=1)


@pytest.mark.parametrize("layer_cls", [batchnorm.BatchNorm1d, nn.BatchNorm1d])
@pytest.mark.parametrize("extra", [(), (6,)], ids=["BxN", "BxCxL"])
def test_precise_statistics_are_the_exact_statistics_of_the_data(layer_cls, extra):
    gen = torch.Generator().manual_seed(1)
    batches = _batches(SIZES, extra=extra, gen=gen)
    layer = layer_cls(4, momentum=0.3, dtype=torch.float64).eval()
    counts = batchnorm.precise_statistics(nn.Sequential(layer), batches)
    mean, var = _exact(batches)
    assert_close(layer.running_mean, mean, 1e-13, 1e-13, "running_mean")
    assert_close(layer.running_var, var, 1e-13, 1e-13, "running_var")
    assert counts == {"0": sum(SIZES) * (extra[0] if extra else 1)}
    assert not layer.training and layer.momentum == 0.3 and layer.track_running_stats
    assert int(layer.num_batches_tracked) == 0


@pytest.mark.parametrize("layer_cls", [batchnorm.BatchNorm2d, nn.BatchNorm2d])
def test_population_moments_are_the_data_moments_and_change_nothing(layer_cls):
    gen = torch.Generator().manual_seed(4)
    batches = _batches(SIZES, extra=(3, 2), gen=gen)
    model = nn.Sequential(layer_cls(4, dtype=torch.float64))
    before = copy.deepcopy(model.state_dict())
    moments = batchnorm.population_moments(model, batches)
    x = np.concatenate([b.numpy() for b in batches])
    x = np.moveaxis(x, 1, 0).reshape(4, -1)
    assert moments["0"].count == x.shape[1]
    assert_close(moments["0"].mean, x.mean(1), 1e-13, 1e-13, "mean")
    assert_close(moments["0"].var, x.var(1), 1e-13, 1e-13, "biased var")
    assert model[0].training and model[0].track_running_stats
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert batchnorm.population_moments(model, []) == {"0": None}


def test_precise_statistics_of_a_deep_model_pool_what_each_layer_sees():
    """Every layer's buffers: the pooled statistics of the inputs it got, its predecessors
    normalizing with batch statistics (as in training); the weights untouched."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3), batchnorm.BatchNorm2d(5, activation="relu"), nn.Dropout(0.5),
        nn.Conv2d(5, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 4 * 3, 7), batchnorm.BatchNorm1d(7),
    ).double().eval()  # fmt: skip
    batches = _batches((4, 9, 3), channels=3, extra=(8, 7), gen=torch.Generator().manual_seed(3))
    weights = copy.deepcopy(dict(model.named_parameters()))
    seen = {name: [] for name in ("1", "4", "7")}
    probe = copy.deepcopy(model)
    for name in seen:
        probe.get_submodule(name).train().track_running_stats = False
        probe.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0]))
    with torch.no_grad():
        for b in batches:
            probe(b)
    batchnorm.precise_statistics(model, iter(batches))
    for name, inputs in seen.items():
        layer = model.get_submodule(name)
        mean, var = _exact(inputs)
        assert_close(layer.running_mean, mean, 1e-12, 1e-12, f"{name}: running_mean")
        assert_close(layer.running_var, var, 1e-12, 1e-12, f"{name}: running_var")
        assert not layer.training
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]) and p.grad is None, name


def test_precise_statistics_mean_is_update_bns_for_equal_batches_and_the_variance_is_exact():
    """``torch.optim.swa_utils.update_bn`` averages per-batch statistics: with equal batch
    sizes its mean is the pooled one; its variance (the mean of per-batch unbiased variances)
    is not the data's, ours is."""
    batches = _batches((5, 5, 5), gen=torch.Generator().manual_seed(4))
    ours, theirs = nn.BatchNorm1d(4, dtype=torch.float64), nn.BatchNorm1d(4, dtype=torch.float64)
    batchnorm.precise_statistics(nn.Sequential(ours), batches)
    torch.optim.swa_utils.update_bn(batches, nn.Sequential(theirs))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-13, atol=1e-13)
    _, var = _exact(batches)
    assert_close(ours.running_var, var, 1e-13, 1e-13, "running_var")
    assert not np.allclose(theirs.running_var.numpy(), var, rtol=1e-3)


def test_precise_statistics_takes_a_data_loader_and_stops_after_num_batches():
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, dtype=torch.float64), torch.zeros(40))
    loader = torch.utils.data.DataLoader(data, batch_size=6)  # 6 x 6 + 4
    layer = batchnorm.BatchNorm1d(3, dtype=torch.float64)
    assert batchnorm.precise_statistics(layer, loader, num_batches=3) == {"": 18}
    mean, var = _exact([data.tensors[0][:18]])
    assert_close(layer.running_mean, mean, 1e-13, 1e-13, "running_mean")
    assert_close(layer.running_var, var, 1e-13, 1e-13, "running_var")


def test_precise_statistics_needs_a_batch_norm_layer_and_restores_the_layers_on_error():
    with pytest.raises(ValueError, match="no batch-norm layer with running statistics"):
        batchnorm.precise_statistics(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), [])
    layer = batchnorm.BatchNorm1d(3).eval()
    with pytest.raises(ValueError, match="channels"):
        batchnorm.precise_statistics(layer, [torch.randn(4, 5)])
    assert not layer.training and layer.track_running_stats and not layer._forward_pre_hooks


def _micro_batches(sizes, gen):
    return [torch.randn(n, 4, 3, 2, dtype=torch.float64, generator=gen) * 2 - 1 for n in sizes]


@pytest.mark.parametrize("layer_cls", [batchnorm.BatchNorm2d, nn.BatchNorm2d])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_accumulate_updates_once_per_k_micro_batches_as_the_big_batch_would(layer_cls, momentum):
    gen = torch.Generator().manual_seed(5)
    layer = layer_cls(4, momentum=momentum, dtype=torch.float64)
    big = nn.BatchNorm2d(4, momentum=momentum, dtype=torch.float64)  # torch's layer on the whole batch
    with batchnorm.accumulate(layer, steps=3):
        for _ in range(2):
            micro = _micro_batches((4, 6, 5), gen)
            for k, x in enumerate(micro):
                y = layer(x)
                alone = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, True)
                torch.testing.assert_close(y, alone, rtol=1e-12, atol=1e-12)  # normalized per micro-batch
                if k < 2:
                    torch.testing.assert_close(layer.running_mean, big.running_mean, rtol=0, atol=0)
            big(torch.cat(micro))
            torch.testing.assert_close(layer.running_mean, big.running_mean, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(layer.running_var, big.running_var, rtol=1e-12, atol=1e-14)
            assert int(layer.num_batches_tracked) == int(big.num_batches_tracked)
    assert int(layer.num_batches_tracked) == 2 and layer.track_running_stats and not layer._forward_pre_hooks


def test_accumulate_one_step_is_the_plain_update_and_a_partial_group_is_pooled_on_leaving():
    gen = torch.Generator().manual_seed(6)
    micro = _micro_batches((3, 4, 5, 6, 2), gen)
    plain, accumulated = batchnorm.BatchNorm2d(4, dtype=torch.float64), batchnorm.BatchNorm2d(4, dtype=torch.float64)
    with batchnorm.accumulate(accumulated, steps=1):
        for x in micro:
            accumulated(x)
            plain(x)
    torch.testing.assert_close(accumulated.running_var, plain.running_var, rtol=1e-12, atol=1e-14)
    assert int(accumulated.num_batches_tracked) == 5
    grouped, big = batchnorm.BatchNorm2d(4, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
    with batchnorm.accumulate(grouped, steps=3):
        for x in micro:  # 3 + 2: the last two are one update on leaving
            grouped(x)
        grouped.eval()(micro[0])  # eval batches are not counted
    big(torch.cat(micro[:3]))
    big(torch.cat(micro[3:]))
    torch.testing.assert_close(grouped.running_mean, big.running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grouped.running_var, big.running_var, rtol=1e-12, atol=1e-14)
    assert int(grouped.num_batches_tracked) == 2


def test_accumulate_counts_a_checkpointed_micro_batch_once():
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(7)
    micro = _micro_batches((4, 5), gen)
    layer, big = batchnorm.BatchNorm2d(4, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
    with batchnorm.accumulate(layer, steps=2):
        for x in micro:
            checkpoint(layer, x.requires_grad_(), use_reentrant=False).square().sum().backward()
    big(torch.cat(micro))
    torch.testing.assert_close(layer.running_var, big.running_var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [0, -2, 1.5])
def test_accumulate_rejects_a_bad_step_count(steps):
    with (
        pytest.raises(ValueError, match="steps must be a positive integer"),
        batchnorm.accumulate(nn.BatchNorm1d(2), steps=steps),
    ):
        pass


def test_precise_statistics_runs_a_fullgraph_compiled_model():
    """The model may be ``torch.compile(..., fullgraph=True)``'d: no momentum is changed, no
    Python number is read from a tensor (``update_bn``'s cumulative average does both)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    batches = [torch.randn(n, 3) for n in (5, 8, 3)]
    expected = copy.deepcopy(model)
    batchnorm.precise_statistics(expected, batches)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    batchnorm.precise_statistics(compiled, batches)
    for (name, want), got in zip(expected.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
