"""Every CPU backend's fused activation stages (``forward_train``/``backward_train`` with an
activation, and ``forward_train_residual``/``backward_train_residual`` with their sign mask)
against the NumPy float64 reference (``batchnorm.reference``), in float64 and float32."""

from __future__ import annotations

import pytest
import torch

from batchnorm import kernels, reference
from batchnorm.activations import Activation
from batchnorm.kernels import cpu, sign_mask
from tests.helpers import assert_close

ACTS = [Activation("relu"), Activation("leaky_relu", 0.2), Activation("elu", 0.7), Activation("silu")]
CPU_BACKENDS = ["torch", "numba"]  # (not kernels.available(): that would import triton before its tests set it up)


def _channels_last(x):
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _reference(x, w, b, dy, eps, act, residual=None):
    """``(y, dx, dweight, dbias, dresidual)`` of ``act(BN(x) + residual)`` from the float64 reference."""
    y, cache = reference.fused_forward(
        x.double().numpy(), w.double().numpy(), b.double().numpy(), eps,
        None if residual is None else residual.double().numpy(), act.name, act.param,
    )  # fmt: skip
    return (y, *reference.fused_backward(dy.double().numpy(), cache))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize(
    "shape,layout", [((4, 3, 7), "ncl"), ((5, 3, 6), "nlc"), ((9, 4, 1), "ncl"), ((2, 5, 1), "ncl")]
)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float64, 1e-10, 1e-9), (torch.float32, 2e-5, 2e-5)])
def test_fused_activation_stages_match_the_reference(backend, act, shape, layout, dtype, atol, rtol):
    impl = kernels.get(backend)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    eps = 1e-3
    y_ref, dx_ref, dw_ref, db_ref, _ = _reference(x, w, b, dy, eps, act)

    xc, wc, bc, dyc = (t.to(dtype) for t in (x, w, b, dy))
    if layout == "nlc":
        xc, dyc = _channels_last(xc), _channels_last(dyc)
    y, mean, _var, invstd = impl.forward_train(xc, wc, bc, eps, act=act)
    assert y.stride() == xc.stride()
    assert_close(y, y_ref, atol, rtol, "y")
    dx, sum_dz, sum_dz_xmu = impl.backward_train(dyc, xc, mean, invstd, wc, bc, act=act)
    assert_close(dx, dx_ref, atol * 10, rtol * 10, "dx")
    assert_close(sum_dz, db_ref, atol * 10, rtol * 10, "sum_dz (dbias)")
    assert_close(sum_dz_xmu * invstd, dw_ref, atol * 10, rtol * 10, "sum_dz_xmu * invstd (dweight)")


@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """The numba kernels' serial copies, or the parallel ones on 2 threads (with batch splits
    for tensors of few channels)."""
    saved = torch.get_num_threads()
    if request.param == "parallel":
        monkeypatch.setattr(cpu.threads, "PARALLEL_MIN_NUMEL", 0)
        torch.set_num_threads(2)
    yield request.param
    torch.set_num_threads(saved)


RESIDUAL_ACTS = [Activation("identity"), Activation("relu"), Activation("leaky_relu", 0.2)]
# (N, C, L), layout: odd lengths and channel counts (bits that do not fill a byte), rows longer
# than the kernels' blocks, few channels (the parallel kernels split each channel's batch), L == 1,
# many channels
RESIDUAL_SHAPES = [
    ((4, 3, 7), "ncl"),
    ((3, 2, 300), "ncl"),
    ((5, 11, 6), "nlc"),
    ((70, 3, 2), "nlc"),
    ((9, 13, 1), "ncl"),
    ((2, 6, 13), "strided"),
    ((3, 2100, 2), "nlc"),  # two channels-last column blocks
]


def _make_layout(t, layout):
    if layout == "nlc":
        return _channels_last(t)
    if layout == "strided":  # every other element of a wider tensor: neither layout
        wide = torch.zeros(t.shape[0], t.shape[1], 2 * t.shape[2], dtype=t.dtype)
        wide[:, :, ::2] = t
        return wide[:, :, ::2]
    return t


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", RESIDUAL_ACTS, ids=str)
@pytest.mark.parametrize("shape,layout", RESIDUAL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float64, 1e-10, 1e-9), (torch.float32, 2e-5, 2e-5)])
def test_fused_residual_stages_match_the_reference(backend, act, shape, layout, dtype, atol, rtol, threads):
    impl = kernels.get(backend)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    r = torch.randn(shape, dtype=torch.float64)
    w = torch.rand(shape[1], dtype=torch.float64) + 0.5
    b = torch.randn(shape[1], dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    eps = 1e-3
    y_ref, dx_ref, dw_ref, db_ref, dr_ref = _reference(x, w, b, dy, eps, act, residual=r)

    xc, rc, wc, bc, dyc = (t.to(dtype) for t in (x, r, w, b, dy))
    xc, dyc = _make_layout(xc, layout), _make_layout(dyc, layout)
    rc = _make_layout(rc, "nlc" if layout == "ncl" else "ncl")  # the residual in the other layout
    y, mean, _var, invstd, mask = impl.forward_train_residual(xc, wc, bc, eps, rc, act)
    assert_close(y, y_ref, atol, rtol, "y")
    if layout != "strided":
        assert y.stride() == xc.stride()
    if act.name == "identity":
        assert mask is None
        return
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == sign_mask.shape(xc)
    assert torch.equal(sign_mask.unpack(mask, xc), y > 0), "the mask is the sign of BN(x) + residual"
    dx, dr, sum_dz, sum_dz_xmu = impl.backward_train_residual(dyc, xc, mean, invstd, wc, mask, act)
    assert_close(dx, dx_ref, atol * 10, rtol * 10, "dx")
    assert_close(dr, dr_ref, atol, rtol, "dresidual")
    assert_close(sum_dz, db_ref, atol * 10, rtol * 10, "sum_dz (dbias)")
    assert_close(sum_dz_xmu * invstd, dw_ref, atol * 10, rtol * 10, "sum_dz_xmu * invstd (dweight)")


@pytest.mark.parametrize("forward_on,backward_on", [("numba", "torch"), ("torch", "numba")])
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
def test_a_mask_written_by_one_backend_is_read_by_the_other(forward_on, backward_on, layout):
    act = Activation("leaky_relu", 0.1)
    shape = (5, 9, 11)
    x, r, dy = (_make_layout(torch.randn(shape, dtype=torch.float64), layout) for _ in range(3))
    w, b = torch.rand(9, dtype=torch.float64) + 0.5, torch.randn(9, dtype=torch.float64)
    first, second = kernels.get(forward_on), kernels.get(backward_on)
    y, mean, _var, invstd, mask = first.forward_train_residual(x, w, b, 1e-5, r, act)
    y2, _, _, _, mask2 = second.forward_train_residual(x, w, b, 1e-5, r, act)
    assert_close(y2, y, 1e-12, 1e-10, "y")
    assert torch.equal(mask, mask2)
    got = second.backward_train_residual(dy, x, mean, invstd, w, mask, act)
    want = first.backward_train_residual(dy, x, mean, invstd, w, mask, act)
    for name, g, e in zip(["dx", "dresidual", "sum_dz", "sum_dz_xmu"], got, want, strict=True):
        assert_close(g, e, 1e-12, 1e-10, name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("act", [Activation("identity"), *ACTS], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape,layout", RESIDUAL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 2e-6, 2e-6)])
def test_eval_apply_act_matches_the_reference(backend, act, with_residual, shape, layout, dtype, atol, rtol, threads):
    """Eval ``act(x * scale + shift [+ residual])`` in one call: the reference's inference
    multiply-add, residual add and activation; NaN stays where it was."""
    impl = kernels.get(backend)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    x[0, 0, 0] = float("nan")
    r = torch.randn(shape, dtype=torch.float64) if with_residual else None
    scale = torch.randn(shape[1], dtype=torch.float64)
    shift = torch.randn(shape[1], dtype=torch.float64)
    z = reference.inference(x.numpy(), scale.numpy(), shift.numpy())
    y_ref = reference.activation_forward(z if r is None else z + r.numpy(), act.name, act.param)

    xc, sc, bc = _make_layout(x.to(dtype), layout), scale.to(dtype), shift.to(dtype)
    rc = None if r is None else _make_layout(r.to(dtype), "nlc" if layout == "ncl" else "ncl")  # the other layout
    y = impl.apply_act(xc, sc, bc, rc, act)
    assert y.dtype == dtype and y.shape == xc.shape
    if layout != "strided":
        assert y.stride() == xc.stride()
    assert torch.isnan(y[0, 0, 0]) and torch.isnan(y).sum() == 1  # as torch's activations give NaN
    y_ref[0, 0, 0] = float("nan")  # (the reference's relu takes NaN to 0)
    assert_close(y, y_ref, atol * (10 if act.name in ("elu", "silu") else 1), rtol * 10, "y")
