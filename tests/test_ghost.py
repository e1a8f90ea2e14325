"""Ghost batch norm against torch's batch norm run on each ghost batch alone: outputs,
gradients, and the running statistics as the average of the ghosts' statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close, assert_same_gradients, spy_on

CASES = [((10, 3), 4, False), ((7, 3, 5), 3, False), ((6, 3, 4, 4), 2, True), ((9, 3, 2, 3), 4, False)]
# None: the automatic choice (torch's kernel per ghost at these sizes); forced: the backend's ghost stages
BACKENDS = [None, "numba", "torch"]


def _layer(shape, **kwargs):
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[len(shape)]
    return cls(shape[1], dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "size", "channels_last"), CASES, ids=str)
def test_each_ghost_is_normalized_as_a_batch_of_its_own(shape, size, channels_last, backend):
    with batchnorm.backend(backend):
        _check_ghosts_against_torch(shape, size, channels_last)


def _check_ghosts_against_torch(shape, size, channels_last):
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "elu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_activation_with_ghosts(backend, activation, with_residual):
    gen = torch.Generator().manual_seed(2)
    fused = batchnorm.BatchNorm1d(3, virtual_batch_size=2, activation=activation, dtype=torch.float64)
    plain = copy.deepcopy(fused)
    plain.activation = batchnorm.activations.IDENTITY
    x, r = (torch.randn(7, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    if not with_residual:
        r = torch.zeros_like(r, requires_grad=True)
    torch_act = {"relu": torch.relu, "elu": nn.functional.elu, "silu": nn.functional.silu}[activation]
    with batchnorm.backend(backend):
        y = fused(x, r) if with_residual else fused(x)
    expected = torch_act(plain(x) + r)
    assert_close(y, expected, 1e-12, 1e-12, f"{activation}(ghost BN + r)")
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    params = (x, r, fused.weight, fused.bias) if with_residual else (x, fused.weight, fused.bias)
    got = torch.autograd.grad(y, params, dy)
    want = torch.autograd.grad(expected, (*params[:-2], plain.weight, plain.bias), dy)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_close(g, w, 1e-11, 1e-11, f"gradient {i}")


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_ghost_gradients_and_double_backward_pass_gradcheck(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)

    def f(x, w, b):
        return batchnorm.functional.batch_norm(x, None, None, w, b, True, activation="silu", virtual_batch_size=3)

    with batchnorm.backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_a_large_batch_runs_the_ghost_kernels_unforced_and_equals_torch_per_ghost(monkeypatch):
    """Large enough for the automatic choice to take the numba backend: one launch for all ghosts."""
    calls = spy_on(monkeypatch, type(batchnorm.kernels.get("numba")), "forward_train_ghosts", "backward_train_ghosts")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, 16, 48, 48, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer = batchnorm.BatchNorm2d(16, virtual_batch_size=4, activation="relu")
    assert batchnorm.kernels.select(x.detach().flatten(2), fused=True).name == "numba"
    y = layer(x)
    expected = torch.cat([torch.relu(nn.functional.batch_norm(g, None, None, layer.weight, layer.bias, True))
                          for g in x.split(4)])  # fmt: skip
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=gen)
    for name, g, w in zip(("dx", "dweight", "dbias"), torch.autograd.grad(y, (x, layer.weight, layer.bias), dy),
                          torch.autograd.grad(expected, (x, layer.weight, layer.bias), dy), strict=True):  # fmt: skip
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
    assert calls == ["forward_train_ghosts", "backward_train_ghosts"]


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


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_compiled_ghost_layer_is_torchs_layer_on_each_ghost(channels_last):
    """torch.compile(fullgraph=True) of a ghost layer: outputs and every gradient those of torch's layer per
    ghost (shared γ/β), the running statistics those of the eager layer."""
    gen = torch.Generator().manual_seed(5)
    layer = batchnorm.BatchNorm2d(4, virtual_batch_size=3)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.uniform_(-0.5, 0.5, generator=gen)
    eager, theirs = copy.deepcopy(layer), nn.BatchNorm2d(4)
    theirs.load_state_dict(layer.state_dict())
    x = torch.randn(8, 4, 5, 3, generator=gen)  # ghosts of 3, 3 and 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xc, xt, xe = (x.clone().requires_grad_() for _ in range(3))
    y = torch.compile(layer, fullgraph=True)(xc)
    eager(xe)
    expected = torch.cat([nn.functional.batch_norm(g, None, None, theirs.weight, theirs.bias, True)
                          for g in xt.split(3)])  # fmt: skip
    assert_close(y, expected, 1e-5, 1e-6, "output")
    dy = torch.randn(x.shape, generator=gen)
    assert_same_gradients(y, (xc, layer.weight, layer.bias), expected, (xt, theirs.weight, theirs.bias), dy,
                          1e-4, 1e-5)  # fmt: skip
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(layer, name), getattr(eager, name), 1e-6, 1e-7, name)
