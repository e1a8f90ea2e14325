"""The running-statistics update: the compiled CPU form against torch's formula, and its NaN/Inf skip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import running
from batchnorm.running import running_update


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_follows_torchs_formula(dtype):
    rng = np.random.default_rng(0)
    rm, rv = rng.standard_normal(7).astype(dtype), rng.random(7).astype(dtype) + 0.5
    mean, var = rng.standard_normal(7).astype(dtype), rng.random(7).astype(dtype)
    expect_m = 0.9 * rm.astype(np.float64) + 0.1 * mean
    expect_v = 0.9 * rv.astype(np.float64) + 0.1 * 10 / 9 * var
    assert running_update(rm, rv, mean, var, 0.1, 0.1 * 10 / 9, True)
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(rm, expect_m, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv, expect_v, rtol=tol, atol=tol)


def test_a_nonfinite_statistic_leaves_both_buffers_alone_unless_told_otherwise():
    rm, rv = np.zeros(3), np.ones(3)
    mean, var = np.array([0.0, np.nan, 1.0]), np.ones(3)
    assert not running_update(rm, rv, mean, var, 0.5, 0.5, True)
    assert (rm == 0).all() and (rv == 1).all()
    assert running_update(rm, rv, mean, var, 0.5, 0.5, False)
    assert np.isnan(rm[1]) and rv[0] == 1.0


def test_either_buffer_may_be_absent():
    rv = np.ones(2)
    assert running_update(np.empty(0), rv, np.ones(2), np.full(2, 3.0), 0.5, 0.5, True)
    np.testing.assert_allclose(rv, [2.0, 2.0])


@pytest.mark.parametrize("device_side", [False, True], ids=["cpu-compiled", "tensor-ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_update_from_invstd_is_the_update_from_the_variance_it_encodes(dtype, device_side, monkeypatch):
    """torch's ``native_batch_norm`` gives ``invstd = 1 / sqrt(var + eps)``: the update from it
    equals the update from ``var`` (the variance recovered in float64 inside the compiled call),
    counters and the non-finite skip included."""
    if device_side:  # the tensor-ops form, as on an accelerator
        monkeypatch.setattr(running.torch.compiler, "is_compiling", lambda: True)
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(6, generator=gen, dtype=dtype)
    var = torch.rand(6, generator=gen, dtype=dtype) * 3 + 0.01
    eps = 1e-3
    invstd = torch.rsqrt(var + eps)
    for momentum in (0.1, None):
        rm1, rv1 = torch.randn(6, generator=gen, dtype=dtype), torch.rand(6, generator=gen, dtype=dtype) + 0.5
        rm2, rv2 = rm1.clone(), rv1.clone()
        (n1, f1), (n2, f2) = (torch.tensor(3), torch.tensor(0)), (torch.tensor(3), torch.tensor(0))
        running.update_running_stats(rm1, rv1, mean, var, 40, momentum, n1, True, f1)
        running.update_from_invstd(rm2, rv2, mean, invstd, eps, 40, momentum, n2, True, f2)
        torch.testing.assert_close(rm2, rm1)
        torch.testing.assert_close(rv2, rv1)
        assert int(n1) == int(n2) == 4 and int(f1) == int(f2) == 0
    bad = invstd.clone()
    bad[2] = float("nan")
    rm, rv, n, f = torch.zeros(6, dtype=dtype), torch.ones(6, dtype=dtype), torch.tensor(0), torch.tensor(0)
    running.update_from_invstd(rm, rv, mean, bad, eps, 40, 0.1, n, True, f)
    assert (rm == 0).all() and (rv == 1).all() and int(n) == 0 and int(f) == 1


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("backend", [None, "numba"])
def test_checkpointed_forward_updates_running_statistics_once(reentrant, backend):
    """Under ``torch.utils.checkpoint`` the recomputation in the backward normalizes again but
    leaves the running statistics alone: buffers, outputs and gradients equal the same model's
    without checkpointing (torch's own layers count such a batch twice, pytorch#96136)."""
    import copy

    from torch.utils.checkpoint import checkpoint

    import batchnorm

    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="relu"),
        torch.nn.Conv2d(4, 5, 3), batchnorm.BatchNorm2d(5, momentum=None),
    ).double()  # fmt: skip
    checkpointed = copy.deepcopy(plain)
    with batchnorm.backend(backend):
        for _ in range(3):
            x = torch.randn(4, 3, 9, 8, dtype=torch.float64)
            y = plain(x)
            y.square().sum().backward()
            y_ckpt = checkpoint(checkpointed, x.requires_grad_(), use_reentrant=reentrant)
            y_ckpt.square().sum().backward()
            torch.testing.assert_close(y_ckpt, y, rtol=1e-12, atol=1e-12)
    for (name, expected), got in zip(plain.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=name)
    assert int(checkpointed[3].num_batches_tracked) == 3
    for expected, got in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-10, atol=1e-12)
