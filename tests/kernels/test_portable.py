"""The ``torch`` backend's stages against the NumPy reference, on the (N, C, L) view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.activations import Activation
from batchnorm.kernels import get
from tests.helpers import assert_close

BACKEND = get("torch")
# (dtype, atol, rtol) travel together
DTYPES = [
    (torch.float64, 1e-10, 1e-10),
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 5e-2, 2e-2),
    (torch.float16, 1e-2, 1e-2),
]
SHAPES = [(2, 3, 5), (1, 4, 2), (2, 1, 1), (7, 5, 1), (3, 2, 13)]


def _layouts(x):
    """The same values as contiguous (N, C, L), channels-last (N, L, C) storage, and a strided view."""
    yield "contiguous", x
    yield "channels_last", x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2], dtype=x.dtype)
    wide[:, :, ::2] = x
    yield "strided", wide[:, :, ::2]


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(shape, dtype, atol, rtol):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    eps = 1e-3
    y_ref, cache = reference.forward(x.double().numpy(), weight.double().numpy(), bias.double().numpy(), eps)
    dx_ref, dw_ref, db_ref = reference.backward(dy.double().numpy(), cache)
    for layout, xl in _layouts(x):
        y, mean, var, invstd = BACKEND.forward_train(xl, weight, bias, eps)
        assert y.dtype == dtype and mean.dtype == var.dtype == invstd.dtype
        if layout != "strided":
            assert y.stride() == xl.stride(), layout
        assert_close(y, y_ref, atol * 10, rtol * 10, f"{layout} y")
        assert_close(mean, cache.mean, atol, rtol, f"{layout} mean")
        assert_close(var, cache.var, atol, rtol, f"{layout} var")
        assert_close(invstd, 1 / np.sqrt(cache.var + eps), atol, rtol, f"{layout} invstd")
        dx, sum_dy, sum_dy_xmu = BACKEND.backward_train(dy, xl, mean, invstd, weight)
        assert_close(dx, dx_ref, atol * 10, rtol * 10, f"{layout} dx")
        assert_close(sum_dy, db_ref, atol * 10, rtol * 10, f"{layout} dbias")
        assert_close(sum_dy_xmu * invstd, dw_ref, atol * 10, rtol * 10, f"{layout} dweight")


def test_apply_is_one_multiply_add():
    x = torch.randn(3, 4, 5)
    scale, shift = torch.randn(4), torch.randn(4)
    expected = reference.inference(x.double().numpy(), scale.double().numpy(), shift.double().numpy())
    assert_close(BACKEND.apply(x, scale, shift), expected, 1e-6, 1e-6, "apply")


def test_variance_is_stable_for_large_means():
    x64 = torch.randn(8, 3, 1000, dtype=torch.float64) + 1e4
    _, var = BACKEND.stats(x64.float())
    expected = reference.batch_stats(x64.float().double().numpy())[1]
    assert_close(var, expected, 0, 1e-4, "var at mean 1e4")


def test_no_weight_means_unit_scale():
    x = torch.randn(4, 3, 6)
    y, _, _, _ = BACKEND.forward_train(x, None, None, 1e-5)
    y_ref, _ = reference.forward(x.double().numpy(), np.ones(3), np.zeros(3), 1e-5)
    assert_close(y, y_ref, 1e-5, 1e-5, "y")


def test_deprecated_act_methods_warn_and_return_the_old_values():
    """``forward_train_act``/``backward_train_act`` (the names before the activation became an
    argument) still work, with a DeprecationWarning, and return what they returned then."""
    x, dy = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    weight, bias = torch.randn(3), torch.randn(3)
    act = Activation("relu")
    y, mean, var, invstd = BACKEND.forward_train(x, weight, bias, 1e-5, act)
    with pytest.warns(DeprecationWarning, match="forward_train"):
        old = BACKEND.forward_train_act(x, weight, bias, 1e-5, act)
    assert len(old) == 3
    for a, b in zip(old, (y, mean, var), strict=True):
        assert torch.equal(a, b)
    with pytest.warns(DeprecationWarning, match="backward_train"):
        grads = BACKEND.backward_train_act(dy, x, mean, invstd, weight, bias, act)
    for a, b in zip(grads, BACKEND.backward_train(dy, x, mean, invstd, weight, bias, act), strict=True):
        assert torch.equal(a, b)
