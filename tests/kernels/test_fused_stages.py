"""Every CPU backend's fused activation stages (``forward_train_act``/``backward_train_act``)
against torch's autograd through the composite formula, in float64 and float32."""

from __future__ import annotations

import pytest
import torch

from batchnorm import kernels
from batchnorm.activations import Activation
from batchnorm.functional import composite_forward
from tests.helpers import assert_close

ACTS = [Activation("relu"), Activation("leaky_relu", 0.2), Activation("elu", 0.7), Activation("silu")]
CPU_BACKENDS = ["torch", "numba"]  # (not kernels.available(): that would import triton before its tests set it up)


def _channels_last(x):
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize(
    "shape,layout", [((4, 3, 7), "ncl"), ((5, 3, 6), "nlc"), ((9, 4, 1), "ncl"), ((2, 5, 1), "ncl")]
)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float64, 1e-10, 1e-9), (torch.float32, 2e-5, 2e-5)])
def test_fused_activation_stages_match_autograd(backend, act, shape, layout, dtype, atol, rtol):
    impl = kernels.get(backend)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    eps = 1e-3
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y_ref = composite_forward(xr, wr, br, eps, None, act)
    dx_ref, dw_ref, db_ref = torch.autograd.grad(y_ref, (xr, wr, br), dy)

    xc, wc, bc, dyc = (t.to(dtype) for t in (x, w, b, dy))
    if layout == "nlc":
        xc, dyc = _channels_last(xc), _channels_last(dyc)
    y, mean, var = impl.forward_train_act(xc, wc, bc, eps, act)
    assert y.stride() == xc.stride()
    assert_close(y, y_ref, atol, rtol, "y")
    invstd = torch.rsqrt(var + eps)
    dx, sum_dz, sum_dz_xmu = impl.backward_train_act(dyc, xc, mean, invstd, wc, bc, act)
    assert_close(dx, dx_ref, atol * 10, rtol * 10, "dx")
    assert_close(sum_dz, db_ref, atol * 10, rtol * 10, "sum_dz (dbias)")
    assert_close(sum_dz_xmu * invstd, dw_ref, atol * 10, rtol * 10, "sum_dz_xmu * invstd (dweight)")
