"""Comparisons for tests that say where they fail: max and mean error, and where."""

from __future__ import annotations

import numpy as np
import torch


def assert_close(actual, expected, atol: float, rtol: float, what: str = "") -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` everywhere, else report
    the max and mean error and the index of the worst element."""
    a = np.asarray(actual.detach().cpu().double() if isinstance(actual, torch.Tensor) else actual, np.float64)
    e = np.asarray(expected.detach().cpu().double() if isinstance(expected, torch.Tensor) else expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    err = np.abs(a - e)
    bad = ~(err <= atol + rtol * np.abs(e)) & ~(np.isnan(a) & np.isnan(e))
    if bad.any():
        worst = np.unravel_index(np.argmax(np.where(bad, np.nan_to_num(err, nan=np.inf), -1)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.size} elements off; max error {err.max():.3e} at {worst} "
            f"(got {a[worst]:.6g}, expected {e[worst]:.6g}), mean error {err.mean():.3e}, "
            f"atol={atol}, rtol={rtol}"
        )


def assert_same_gradients(y, wrt, y_ref, wrt_ref, dy, atol: float, rtol: float) -> None:
    """The gradients of ``y`` w.r.t. ``wrt`` (input, weight, bias) under cotangent ``dy`` equal those of
    ``y_ref`` w.r.t. ``wrt_ref``."""
    got = torch.autograd.grad(y, wrt, dy)
    want = torch.autograd.grad(y_ref, wrt_ref, dy)
    for name, g, w in zip(("dx", "dweight", "dbias"), got, want, strict=True):
        assert_close(g, w, atol, rtol, name)


def backends_fixture():
    """An autouse fixture running a test module once per backend choice: automatic
    (torch's own kernels for small CPU inputs), and the ``torch`` and ``numba`` backends forced."""
    import pytest

    import batchnorm

    @pytest.fixture(autouse=True, params=["auto", "torch", "numba"])
    def each_backend(request):
        if request.param == "auto":
            yield request.param
            return
        with batchnorm.backend(request.param):
            yield request.param

    return each_backend


def spy_on(monkeypatch, cls, *names: str) -> list[str]:
    """The names of ``cls``'s methods ``names`` in the order they are called from now on (each
    still runs as before)."""
    calls: list[str] = []
    for name in names:
        original = getattr(cls, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, name, spy)
    return calls
