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
