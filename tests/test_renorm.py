"""Batch Renormalization against a hand-written float64 reference of Ioffe (2017)'s
formulas, against batch norm where they coincide (rmax = 1, dmax = 0, and eval), and
through the paths a layer takes (fused activation and residual, checkpointing,
state_dict, torch.compile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchRenorm1d, BatchRenorm2d
from tests.helpers import assert_close, backends_fixture

each_backend = backends_fixture()


def paper_forward(x, gamma, beta, running_mean, running_var, eps, rmax, dmax):
    """NumPy float64: Algorithm 1 of the paper on (N, C, *) with our running estimates
    (sigma = sqrt(running_var + eps)); returns y, r, d and the batch's mean and biased var."""
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mu_b, var_b = x.mean(axes), x.var(axes)
    sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(running_var + eps)
    r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    d = np.clip((mu_b - running_mean) / sigma, -dmax, dmax)
    xhat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    return gamma.reshape(shape) * xhat + beta.reshape(shape), r, d, mu_b, var_b


def torch_formula(x, layer):
    """The same formula in torch ops, r and d detached: the gradient's oracle."""
    axes = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var_b, mu_b = torch.var_mean(x, axes, correction=0)
    sigma_b = (var_b + layer.eps).sqrt()
    sigma = (layer.running_var + layer.eps).sqrt()
    r = (sigma_b / sigma).detach().clamp(1 / layer.rmax, layer.rmax)
    d = ((mu_b - layer.running_mean) / sigma).detach().clamp(-layer.dmax, layer.dmax)
    xhat = (x - mu_b.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    return layer.weight.view(shape) * xhat + layer.bias.view(shape)


@pytest.mark.parametrize("shape", [(16, 3), (6, 3, 5, 4)], ids=str)
@pytest.mark.parametrize("clipped", [False, True])
def test_training_matches_the_paper_and_its_gradient(shape, clipped, each_backend):
    gen = torch.Generator().manual_seed(0)
    cls = BatchRenorm1d if len(shape) == 2 else BatchRenorm2d
    layer = cls(3, momentum=0.2, rmax=1.5 if clipped else 100.0, dmax=0.3 if clipped else 100.0, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=gen)
        layer.bias.uniform_(-1, 1, generator=gen)
        layer.running_mean.copy_(torch.tensor([2.0, -1.0, 0.1]))  # far from the batch: the clip bites
        layer.running_var.copy_(torch.tensor([0.05, 9.0, 1.1]))
    x = (torch.randn(shape, dtype=torch.float64, generator=gen) * 1.7 + 0.4).requires_grad_()
    rm, rv = layer.running_mean.clone().numpy(), layer.running_var.clone().numpy()
    expected = torch_formula(x, layer)
    gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    y, r, d, mu_b, var_b = paper_forward(x.detach().numpy(), gamma, beta, rm, rv, layer.eps, layer.rmax, layer.dmax)
    if clipped:  # the case exercises both clips
        assert ((r == 1.5) | (r == 1 / 1.5)).any() and (np.abs(d) == 0.3).any()
    out = layer(x)
    assert_close(out, y, 1e-12, 1e-12, "y")
    dy = torch.randn(shape, dtype=torch.float64, generator=gen)
    grads = torch.autograd.grad(out, (x, layer.weight, layer.bias), dy)
    want = torch.autograd.grad(expected, (x, layer.weight, layer.bias), dy)
    for name, got, w in zip(("dx", "dweight", "dbias"), grads, want, strict=True):
        assert_close(got, w, 1e-11, 1e-11, name)
    n = x.numel() // 3
    assert_close(layer.running_mean, 0.8 * rm + 0.2 * mu_b, 1e-13, 1e-13, "running_mean")
    assert_close(layer.running_var, 0.8 * rv + 0.2 * var_b * n / (n - 1), 1e-13, 1e-13, "running_var")
    assert int(layer.renorm_step) == 1 and int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("channels_last", [False, True])
def test_rmax_one_dmax_zero_is_batch_norm_to_the_bit(channels_last, each_backend):
    gen = torch.Generator().manual_seed(1)
    renorm = BatchRenorm2d(5, rmax=1.0, dmax=0.0)
    plain = batchnorm.BatchNorm2d(5)
    for _ in range(3):
        x = torch.randn(4, 5, 6, 7, generator=gen) * 2 + 1
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(4, 5, 6, 7, generator=gen)
        outs = []
        for layer in (renorm, plain):
            xx = x.clone().requires_grad_()
            y = layer(xx)
            y.backward(dy)
            outs.append((y, xx.grad, layer.weight.grad, layer.bias.grad))
            layer.zero_grad()
        for got, want in zip(*outs, strict=True):
            assert torch.equal(got, want)
    for key, value in plain.state_dict().items():
        assert torch.equal(renorm.state_dict()[key], value), key
    torch_bn = nn.BatchNorm2d(5)
    torch_bn.load_state_dict(plain.state_dict())
    x = torch.randn(4, 5, 6, 7, generator=gen)
    torch.testing.assert_close(renorm.eval()(x), torch_bn.eval()(x))  # eval: the batch norm's


def test_schedule_warms_up_as_batch_norm_then_ramps():
    layer = BatchRenorm1d(2, rmax=3.0, dmax=5.0, warmup_steps=2, rmax_ramp_steps=4, dmax_ramp_steps=2)
    plain = batchnorm.BatchNorm1d(2)
    expected = [(1, 0), (1, 0), (1, 0), (1.5, 2.5), (2, 5), (2.5, 5), (3, 5), (3, 5)]
    gen = torch.Generator().manual_seed(2)
    for step, (rmax, dmax) in enumerate(expected):
        got = [float(v) for v in layer.bounds()]
        assert got == pytest.approx([rmax, dmax]), step
        x = torch.randn(8, 2, generator=gen) * 3
        y = layer(x)
        if step < 3:  # warm-up (and the ramps' first step): the batch norm exactly
            assert torch.equal(y, plain(x))
    assert int(layer.renorm_step) == len(expected)
    assert "warmup_steps=2" in repr(layer) and "rmax=3" in repr(layer)


def test_fused_activation_and_residual_match_the_composition():
    gen = torch.Generator().manual_seed(3)
    fused = BatchRenorm2d(4, rmax=1.2, dmax=0.5, activation="relu", dtype=torch.float64)
    plain = BatchRenorm2d(4, rmax=1.2, dmax=0.5, dtype=torch.float64)
    with torch.no_grad():
        for layer in (fused, plain):
            layer.running_mean.fill_(0.7)
            layer.running_var.fill_(0.2)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=gen).requires_grad_()
    res = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=gen).requires_grad_()
    y = fused(x, res)
    z = torch.relu(plain(x) + res)
    assert_close(y, z, 1e-12, 1e-12, "y")
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, res, fused.weight), dy),
                         torch.autograd.grad(z, (x, res, plain.weight), dy), strict=True):  # fmt: skip
        assert_close(got, want, 1e-11, 1e-11, "grad")


def test_state_dict_is_a_batch_norms_plus_the_step_and_a_batch_norm_checkpoint_loads():
    layer = BatchRenorm2d(3, warmup_steps=10)
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(3).state_dict()) | {"renorm_step"}
    layer(torch.randn(4, 3, 2, 2))
    layer.load_state_dict(nn.BatchNorm2d(3).state_dict())  # strict: the step is kept
    assert int(layer.renorm_step) == 1 and float(layer.running_var.sum()) == 3.0
    other = BatchRenorm2d(3, warmup_steps=10)
    other.load_state_dict(layer.state_dict())
    assert int(other.renorm_step) == 1
    assert isinstance(layer, batchnorm.BatchNorm2d) and isinstance(layer, nn.BatchNorm2d)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rmax": 0.5}, "rmax >= 1"), ({"dmax": -1.0}, "dmax >= 0"),
     ({"track_running_stats": False}, "track_running_stats must be True"),
     ({"warmup_steps": -1}, "warmup_steps must be a non-negative integer")],
)  # fmt: skip
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm2d(3, **kwargs)


def test_checkpointed_forward_counts_one_step():
    from torch.utils.checkpoint import checkpoint

    layer = BatchRenorm1d(3)
    x = torch.randn(6, 3, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    assert int(layer.renorm_step) == 1 and int(layer.num_batches_tracked) == 1


def test_fullgraph_compile_on_the_schedule():
    torch.manual_seed(4)
    layer = BatchRenorm1d(3, warmup_steps=1, rmax_ramp_steps=2, dmax_ramp_steps=2)
    twin = BatchRenorm1d(3, warmup_steps=1, rmax_ramp_steps=2, dmax_ramp_steps=2)
    compiled = torch.compile(twin, fullgraph=True, backend="eager")
    for _ in range(4):
        x = torch.randn(8, 3) * 2 + 1
        torch.testing.assert_close(compiled(x), layer(x))
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, msg=key)


def test_torchscript_says_to_freeze_or_fold_and_frozen_it_scripts():
    layer = BatchRenorm2d(3).eval()
    with pytest.raises(RuntimeError, match="freeze or fold it first"):
        torch.jit.script(layer)
    x = torch.randn(2, 3, 4, 4)
    scripted = torch.jit.script(batchnorm.freeze(nn.Sequential(layer)))
    torch.testing.assert_close(scripted(x), layer(x))
