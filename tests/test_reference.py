"""The NumPy reference against finite differences and against torch in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference
from tests.helpers import assert_close

SHAPES = [(7, 5), (3, 4, 11), (2, 3, 5, 7), (2, 3, 2, 3, 5), (1, 2, 3), (2, 1, 1, 1)]


def _torch_forward_backward(x, gamma, beta, dy, eps):
    xt = torch.tensor(x, requires_grad=True)
    g, b = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, None, None, g, b, training=True, eps=eps)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), g.grad.numpy(), b.grad.numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_torch_float64(shape, rng):
    x = rng.normal(1.5, 2.0, size=shape)
    gamma, beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    dy = rng.normal(size=shape)
    y, cache = reference.forward(x, gamma, beta, eps=1e-3)
    dx, dgamma, dbeta = reference.backward(dy, cache)
    ty, tdx, tdgamma, tdbeta = _torch_forward_backward(x, gamma, beta, dy, 1e-3)
    for ours, theirs, what in ((y, ty, "y"), (dx, tdx, "dx"), (dgamma, tdgamma, "dgamma"), (dbeta, tdbeta, "dbeta")):
        assert_close(ours, theirs, atol=1e-12, rtol=1e-10, what=what)


@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 5, 7), (2, 5, 3, 2, 2)])
def test_channels_last_arrays_match_channels_first(shape, rng):
    x = rng.normal(size=shape)
    gamma, beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    dy = rng.normal(size=shape)
    y, cache = reference.forward(x, gamma, beta)
    dx, dgamma, dbeta = reference.backward(dy, cache)
    last = (0, *range(2, len(shape)), 1)  # move C to the end
    y_l, cache_l = reference.forward(x.transpose(last), gamma, beta, channel_axis=-1)
    dx_l, dgamma_l, dbeta_l = reference.backward(dy.transpose(last), cache_l)
    assert_close(y_l, y.transpose(last), 1e-12, 1e-12, "y")
    assert_close(dx_l, dx.transpose(last), 1e-12, 1e-12, "dx")
    assert_close(dgamma_l, dgamma, 1e-12, 1e-12, "dgamma")
    assert_close(dbeta_l, dbeta, 1e-12, 1e-12, "dbeta")


def test_backward_matches_finite_differences(seed):
    assert reference._check_against_finite_differences(seed % 1000) < 1e-6


def test_training_output_is_normalized_per_channel(rng):
    x = rng.normal(3.0, 5.0, size=(16, 4, 3, 3))
    y, _ = reference.forward(x, np.ones(4), np.zeros(4), eps=0.0)
    assert_close(y.mean(axis=(0, 2, 3)), np.zeros(4), 1e-12, 0, "mean")
    assert_close(y.var(axis=(0, 2, 3)), np.ones(4), 1e-12, 1e-12, "var")


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_update_matches_torch(momentum, rng):
    module = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    rm, rv, count = np.zeros(3), np.ones(3), 0
    for _ in range(3):
        x = rng.normal(2.0, 3.0, size=(4, 3, 2, 5))
        module(torch.tensor(x))
        mean, var, n = reference.batch_stats(x)
        rm, rv, count = reference.update_running(rm, rv, mean, var, n, momentum, count)
    assert count == int(module.num_batches_tracked)
    assert_close(rm, module.running_mean, 1e-12, 1e-12, "running_mean")
    assert_close(rv, module.running_var, 1e-12, 1e-12, "running_var")


def test_inference_affine_is_eval_mode(rng):
    module = torch.nn.BatchNorm1d(5, dtype=torch.float64).eval()
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor(rng.normal(size=5)))
        module.running_var.copy_(torch.tensor(rng.uniform(0.5, 2, size=5)))
        module.weight.copy_(torch.tensor(rng.normal(size=5)))
        module.bias.copy_(torch.tensor(rng.normal(size=5)))
    x = rng.normal(size=(8, 5, 3))
    a, b = reference.inference_affine(
        module.running_mean.numpy(), module.running_var.numpy(),
        module.weight.detach().numpy(), module.bias.detach().numpy(), module.eps,
    )  # fmt: skip
    assert_close(reference.inference(x, a, b), module(torch.tensor(x)), 1e-12, 1e-12, "eval")


# --- the fused form act(BN(x) + residual) and the backward from the output ---------------

ACTIVATIONS = [("identity", 0.0), ("relu", 0.0), ("leaky_relu", 0.2), ("elu", 0.7), ("silu", 0.0)]
ACT_IDS = [name for name, _ in ACTIVATIONS]
INVERTIBLE = [("identity", 0.0), ("leaky_relu", 0.2), ("leaky_relu", 3.0), ("elu", 0.7), ("elu", 1.0)]
FUSED_SHAPES = [(7, 5), (3, 4, 11), (2, 3, 5, 7)]


def _torch_activation(z, name, param):
    if name == "relu":
        return torch.nn.functional.relu(z)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, param)
    if name == "elu":
        return torch.nn.functional.elu(z, param)
    if name == "silu":
        return torch.nn.functional.silu(z)
    return z


def _torch_fused(x, gamma, beta, dy, eps, residual, name, param, channel_axis):
    """act(BN(x) + residual) in float64 torch ops and its gradients by autograd; ``channel_axis=-1``
    arrays are moved to torch's channels-first for batch_norm and back."""
    xt = torch.tensor(x, requires_grad=True)
    g, b = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    rt = None if residual is None else torch.tensor(residual, requires_grad=True)
    first = xt if channel_axis == 1 else xt.movedim(-1, 1)
    z = torch.nn.functional.batch_norm(first, None, None, g, b, training=True, eps=eps)
    z = z if channel_axis == 1 else z.movedim(1, -1)
    if rt is not None:
        z = z + rt
    y = _torch_activation(z, name, param)
    y.backward(torch.tensor(dy))
    dr = None if rt is None else rt.grad.numpy()
    return y.detach().numpy(), xt.grad.numpy(), g.grad.numpy(), b.grad.numpy(), dr


def _fused_inputs(rng, shape, channel_axis, with_residual):
    if channel_axis == -1:
        shape = (shape[0], *shape[2:], shape[1])
    channels = shape[channel_axis]
    x = rng.normal(0.5, 2.0, size=shape)
    gamma, beta = rng.uniform(0.5, 1.5, size=channels) * rng.choice([-1, 1], size=channels), rng.normal(size=channels)
    residual = rng.normal(size=shape) if with_residual else None
    return x, gamma, beta, residual, rng.normal(size=shape)


def test_activations_match_torch_and_its_derivative_at_zero():
    z = np.array([-3.0, -0.5, 0.0, 1e-300, 0.5, 3.0])
    for name, param in ACTIVATIONS:
        zt = torch.tensor(z, requires_grad=True)
        yt = _torch_activation(zt, name, param)
        (grad,) = torch.autograd.grad(yt.sum(), zt) if yt.requires_grad else (torch.ones_like(zt),)
        assert_close(reference.activation_forward(z, name, param), yt, 1e-15, 1e-15, f"{name} forward")
        assert_close(reference.activation_grad(z, name, param), grad, 1e-15, 1e-15, f"{name} grad")
    at_zero = np.zeros(1)
    assert reference.activation_grad(at_zero, "relu", 0.0)[0] == 0.0
    assert reference.activation_grad(at_zero, "leaky_relu", 0.2)[0] == 0.2
    assert reference.activation_grad(at_zero, "elu", 0.7)[0] == 0.7
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        reference.activation_forward(z, "gelu", 0.0)


@pytest.mark.parametrize("name,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_fused_forward_backward_match_torch_autograd_float64(name, param, with_residual, channel_axis, shape, rng):
    x, gamma, beta, residual, dy = _fused_inputs(rng, shape, channel_axis, with_residual)
    y, cache = reference.fused_forward(x, gamma, beta, 1e-3, residual, name, param, channel_axis)
    dx, dgamma, dbeta, dresidual = reference.fused_backward(dy, cache)
    ty, tdx, tdgamma, tdbeta, tdresidual = _torch_fused(x, gamma, beta, dy, 1e-3, residual, name, param, channel_axis)
    for ours, theirs, what in ((y, ty, "y"), (dx, tdx, "dx"), (dgamma, tdgamma, "dgamma"), (dbeta, tdbeta, "dbeta")):
        assert_close(ours, theirs, atol=1e-12, rtol=1e-10, what=what)
    if with_residual:
        assert_close(dresidual, tdresidual, atol=1e-12, rtol=1e-12, what="dresidual")
    else:
        assert dresidual is None


@pytest.mark.parametrize("name,param", ACTIVATIONS, ids=ACT_IDS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_fused_backward_matches_finite_differences(name, param, with_residual, channel_axis, seed):
    error = reference._check_fused_against_finite_differences(seed % 1000, name, param, with_residual, channel_axis)
    assert error < 1e-6


def test_fused_identity_without_residual_is_the_plain_forward(rng):
    x, gamma, beta, _, dy = _fused_inputs(rng, (4, 3, 5), 1, False)
    y, cache = reference.fused_forward(x, gamma, beta)
    y_plain, cache_plain = reference.forward(x, gamma, beta)
    assert np.array_equal(y, y_plain)
    for fused, plain in zip(reference.fused_backward(dy, cache)[:3], reference.backward(dy, cache_plain), strict=True):
        assert np.array_equal(fused, plain)


@pytest.mark.parametrize("name,param", INVERTIBLE, ids=[f"{n}({p:g})" for n, p in INVERTIBLE])
@pytest.mark.parametrize("channel_axis", [1, -1])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=str)
def test_backward_from_output_equals_fused_backward(name, param, channel_axis, shape, rng):
    x, gamma, beta, _, dy = _fused_inputs(rng, shape, channel_axis, False)
    y, cache = reference.fused_forward(x, gamma, beta, 1e-3, None, name, param, channel_axis)
    dx, dgamma, dbeta, _ = reference.fused_backward(dy, cache)
    got = reference.backward_from_output(dy, y, gamma, beta, cache.bn.var, 1e-3, name, param, channel_axis)
    for g, e, what in zip(got, (dx, dgamma, dbeta), ("dx", "dgamma", "dbeta"), strict=True):
        assert_close(g, e, atol=1e-12, rtol=1e-10, what=what)


def test_backward_from_output_refuses_what_it_cannot_invert(rng):
    x, gamma, beta, _, dy = _fused_inputs(rng, (4, 3, 5), 1, False)
    y, cache = reference.fused_forward(x, gamma, beta, activation="relu")
    var = cache.bn.var
    for name, param in (("relu", 0.0), ("silu", 0.0), ("leaky_relu", 0.0), ("elu", 0.0), ("elu", -1.0)):
        with pytest.raises(ValueError, match=f"invertible activation.*got {name} with parameter"):
            reference.backward_from_output(dy, y, gamma, beta, var, 1e-5, name, param)
    gamma[1] = 0.0
    with pytest.raises(ValueError, match=r"every gamma non-zero; channels \[1\]"):
        reference.backward_from_output(dy, y, gamma, beta, var, 1e-5, "leaky_relu", 0.1)
