"""The running-statistics update: the compiled CPU form against torch's formula, and its NaN/Inf skip."""

from __future__ import annotations

import numpy as np
import pytest

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
