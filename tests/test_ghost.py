"""Ghost batch norm against torch's batch norm run on each ghost batch alone: outputs,
gradients, and the running statistics as the average of the ghosts' statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close

CASES = [((10, 3), 4, False), ((7, 3, 5), 3, False), ((6, 3, 4, 4), 2, True), ((9, 3, 2, 3), 4, False)]


def _layer(shape, **kwargs):
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[len(shape)]
    return cls(shape[1], dtype=torch.float64, **kwargs)


@pytest.mark.parametrize(("shape", "size", "channels_last"), CASES, ids=str)
def test_each_ghost_is_normalized_as_a_batch_of_its_own(shape, size, channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    layer = _layer(shape, virtual_batch_size=size, momentum=0.2)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.uniform_(-1, 1, generator=gen)
    y = layer(x)
    ghosts = x.split(size)
    expected = torch.cat([nn.functional.batch_norm(g, None, None, layer.weight, layer.bias, True) for g in ghosts])
    assert_close(y, expected, 1e-12, 1e-12, "y")
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    dy = torch.randn(shape, dtype=torch.float64, generator=gen)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    want = torch.autograd.grad(expected, (x, layer.weight, layer.bias), dy)
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want, strict=True):
        assert_close(g, w, 1e-11, 1e-11, name)
    dims = [0, *range(2, x.dim())]
    means = torch.stack([g.detach().mean(dims) for g in ghosts])
    variances = torch.stack([g.detach().var(dims) for g in ghosts])  # unbiased, per ghost
    assert_close(layer.running_mean, 0.2 * means.mean(0), 1e-13, 1e-13, "running_mean")
    assert_close(layer.running_var, 0.8 + 0.2 * variances.mean(0), 1e-13, 1e-13, "running_var")
    assert int(layer.num_batches_tracked) == 1


def test_a_batch_within_one_ghost_is_plain_batch_norm_and_eval_is_unaffected():
    gen = torch.Generator().manual_seed(1)
    ghost, plain = batchnorm.BatchNorm2d(4, virtual_batch_size=8), batchnorm.BatchNorm2d(4)
    x = torch.randn(8, 4, 3, 3, generator=gen)
    assert torch.equal(ghost(x), plain(x))
    assert torch.equal(ghost.running_var, plain.running_var)
    ghost(torch.randn(16, 4, 3, 3, generator=gen))
    plain.load_state_dict(ghost.state_dict())
    x = torch.randn(16, 4, 3, 3, generator=gen)
    assert torch.equal(ghost.eval()(x), plain.eval()(x))
    assert "virtual_batch_size=8" in repr(ghost)


def test_fused_activation_with_ghosts():
    gen = torch.Generator().manual_seed(2)
    fused = batchnorm.BatchNorm1d(3, virtual_batch_size=2, activation="relu", dtype=torch.float64)
    plain = copy.deepcopy(fused)
    plain.activation = batchnorm.activations.IDENTITY
    x, r = (torch.randn(6, 3, 4, dtype=torch.float64, generator=gen) for _ in range(2))
    assert_close(fused(x, r), torch.relu(plain(x) + r), 1e-12, 1e-12, "relu(ghost BN + r)")


def test_a_ghost_of_one_value_is_refused_and_a_bad_size_too():
    layer = batchnorm.BatchNorm1d(3, virtual_batch_size=2)
    saved = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="more than 1 value per channel in every ghost batch"):
        layer(torch.randn(5, 3))  # ghosts of 2, 2 and 1
    for key, value in saved.items():
        assert torch.equal(layer.state_dict()[key], value), key
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="virtual_batch_size must be a positive integer"):
            batchnorm.BatchNorm1d(3, virtual_batch_size=bad)


def test_a_trace_of_ghost_batches_is_torchs_layer_on_each_ghost():
    """A tracer records torch's ops: the traced layer replays the ghost batches as they were."""
    gen = torch.Generator().manual_seed(3)
    layer = batchnorm.BatchNorm2d(3, virtual_batch_size=2)
    x = torch.randn(6, 3, 4, 4, generator=gen)
    traced = torch.jit.trace(layer, x)
    y = torch.randn(6, 3, 4, 4, generator=gen)
    expected = torch.cat([nn.functional.batch_norm(g, None, None, layer.weight, layer.bias, True) for g in y.split(2)])
    torch.testing.assert_close(traced(y), expected)
