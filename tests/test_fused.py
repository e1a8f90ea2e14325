"""Fused activation and residual add, and the memory-saving mode, against the NumPy float64
reference in training and torch's unfused composition in eval; and how much each keeps for
the backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
from batchnorm import activations, reference
from batchnorm import functional as F
from batchnorm.kernels.cpu.backend import SMALL_NUMEL
from batchnorm.memory import saved_bytes
from tests.helpers import assert_close, backends_fixture

each_backend = backends_fixture()  # small CPU inputs take torch's kernels unless a backend is forced

ACTS = ["identity", "relu", ("leaky_relu", 0.2), ("elu", 0.7), "silu"]
IDS = ["identity", "relu", "leaky_relu", "elu", "silu"]


def _torch_reference(x, bn: nn.Module, act, residual):
    z = bn(x)
    if residual is not None:
        z = z + residual
    return activations.forward(z, activations.parse(act))


def _reference_train(x, layer: nn.Module, act, residual, dy):
    """``(y, dx, dweight, dbias, dresidual)`` of training-mode ``act(BN(x) + residual)`` with
    ``layer``'s weight, bias and eps, from the float64 reference (``dresidual`` None without one)."""
    a = activations.parse(act)
    y, cache = reference.fused_forward(
        x.detach().double().numpy(), layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy(),
        layer.eps, None if residual is None else residual.detach().double().numpy(), a.name, a.param,
    )  # fmt: skip
    return (y, *reference.fused_backward(dy.detach().double().numpy(), cache))


def _pair(shape, act, **kwargs):
    cls = {2: (batchnorm.BatchNorm1d, nn.BatchNorm1d), 4: (batchnorm.BatchNorm2d, nn.BatchNorm2d)}[len(shape)]
    ours, theirs = cls[0](shape[1], activation=act, **kwargs), cls[1](shape[1])
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("act", ACTS, ids=IDS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape,channels_last", [((16, 5), False), ((4, 3, 5, 3), False), ((4, 3, 5, 3), True)])
def test_matches_torch_composition_train_and_eval(act, with_residual, shape, channels_last):
    ours, theirs = _pair(shape, act)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(shape) * 2 + 0.5
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        r = torch.randn(shape) if with_residual else None
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        ro = rt = None
        if with_residual:
            ro, rt = r.clone().requires_grad_(), r.clone().requires_grad_()
        yo, yt = ours(xo, ro), _torch_reference(xt, theirs, act, rt)  # eval's expectation; running stats
        g = torch.randn_like(yt)
        yt.backward(g)
        if training:  # the float64 reference
            y_want, dx_want, dw_want, db_want, dr_want = _reference_train(x, ours, act, r, g)
        else:
            y_want, dx_want, dw_want, db_want = yt, xt.grad, theirs.weight.grad, theirs.bias.grad
            dr_want = rt.grad if with_residual else None
        assert_close(yo, y_want, 1e-5, 1e-5, f"training={training} output")
        if channels_last:
            assert yo.is_contiguous(memory_format=torch.channels_last)
        yo.backward(g)
        assert_close(xo.grad, dx_want, 1e-4, 1e-4, "input grad")
        assert_close(ours.weight.grad, dw_want, 1e-4, 1e-4, "weight grad")
        assert_close(ours.bias.grad, db_want, 1e-4, 1e-4, "bias grad")
        if with_residual:
            assert_close(ro.grad, dr_want, 1e-5, 1e-5, "residual grad")
        ours.zero_grad(), theirs.zero_grad()
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value, 1e-6, 1e-6, key)


@pytest.mark.parametrize("act", ACTS, ids=IDS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", [None, "numba"], ids=["automatic", "numba"])
def test_eval_without_autograd_is_torchs_composition(act, with_residual, channels_last, backend):
    """Eval under no_grad gives what torch's BN, add and activation give, in x's layout: on
    torch's kernel where the registry leaves eval to it (this size), and through our one-pass
    kernel (multiply-add, residual and activation together) where numba runs it."""
    shape = KEPT_SHAPE
    ours, theirs = _pair(shape, act)
    with torch.no_grad():
        theirs.running_mean.normal_()
        theirs.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(theirs.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(shape) * 2 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    r = torch.randn(shape) if with_residual else None  # NCHW: the other layout where x is channels-last
    with torch.no_grad(), batchnorm.kernels.backend(backend):
        on_torch_ops = batchnorm._route.runs_torch_ops(x, ours.weight, ours.bias, fused=True, training=False)
        assert on_torch_ops == (backend is None)
        y = ours(x, r)
        expected = _torch_reference(x, theirs, act, r)
    assert_close(y, expected, 1e-5, 1e-5, "eval output")
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("act", ACTS, ids=IDS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_gradcheck(act, with_residual):
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True) if with_residual else None

    def f(x, w, b, r=None):
        return F.batch_norm(x, None, None, w, b, True, activation=act, residual=r)

    inputs = (x, w, b, r) if with_residual else (x, w, b)
    assert gradcheck(f, inputs)
    if not with_residual or act == "silu":
        assert gradgradcheck(f, inputs)


def test_double_backward_through_a_masked_residual_is_refused_clearly(request):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = F.batch_norm(x, None, None, training=True, activation="relu", residual=r)
    if request.node.callspec.params["each_backend"] == "auto":  # small CPU input: torch's own ops
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        assert gx.requires_grad
        return
    with pytest.raises(RuntimeError, match="double backward through a fused residual add"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(y.square().sum(), x)  # the ordinary backward works
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("act", ["identity", ("leaky_relu", 0.1), ("elu", 1.0)], ids=["identity", "leaky", "elu"])
@pytest.mark.parametrize("inplace", [False, True])
def test_memory_efficient_matches_the_reference(act, inplace):
    """Output and gradients against the float64 reference's forward and its backward from the
    output; the running statistics against the standard layer's."""
    a = activations.parse(act)
    standard, _ = _pair((4, 3, 5, 3), act)
    saving = batchnorm.BatchNorm2d(3, activation=act, memory_efficient=True, inplace=inplace)
    saving.load_state_dict(standard.state_dict())
    gamma, beta = saving.weight.detach().double().numpy(), saving.bias.detach().double().numpy()
    for _ in range(2):
        x = torch.randn(4, 3, 5, 3) * 3 - 1
        w = torch.nn.Conv2d(3, 3, 1)  # a producer, so the in-place write hits a non-leaf
        xs, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        standard(w(xs))
        produced = w(xm)
        y_want, cache = reference.fused_forward(
            produced.detach().double().numpy(), gamma, beta, saving.eps, activation=a.name, param=a.param
        )  # (read before the in-place layer writes over it)
        ym = saving(produced)
        if inplace:
            assert ym.data_ptr() == produced.data_ptr()
        assert_close(ym, y_want, 1e-5, 1e-5, "output")
        g = torch.randn_like(ym)
        ym.backward(g)
        dproduced, dgamma, dbeta = reference.backward_from_output(
            g.double().numpy(), y_want, gamma, beta, cache.bn.var, saving.eps, a.name, a.param
        )
        dx_want = np.einsum("oi,nohw->nihw", w.weight.detach().double().numpy()[:, :, 0, 0], dproduced)  # 1x1 conv
        assert_close(xm.grad, dx_want, 1e-4, 1e-4, "input grad")
        for name, want in (("weight", dgamma), ("bias", dbeta)):
            assert_close(getattr(saving, name).grad, want, 1e-4, 1e-4, name)
        standard.zero_grad(), saving.zero_grad()
    for key, value in standard.state_dict().items():
        assert_close(saving.state_dict()[key], value, 1e-6, 1e-6, key)


def test_memory_efficient_refuses_what_it_cannot_invert():
    with pytest.raises(ValueError, match=r"needs an invertible activation.*got relu"):
        batchnorm.BatchNorm2d(3, activation="relu", memory_efficient=True)
    layer = batchnorm.BatchNorm2d(3, activation="leaky_relu", memory_efficient=True)
    with pytest.raises(ValueError, match="cannot take a residual"):
        layer(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2))
    with torch.no_grad():
        layer.weight[1] = 0
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match=r"every weight \(gamma\) must be non-zero; channels \[1\]"):
        layer(torch.randn(2, 3, 2, 2))
    assert torch.equal(layer.running_mean, before)
    layer.eval()
    layer(torch.randn(2, 3, 2, 2))  # eval keeps nothing for the backward: no condition


@pytest.mark.parametrize("tool", ["compile", "export"])
def test_memory_efficient_layer_compiled_or_exported_is_the_eager_layer(tool):
    """torch.compile(fullgraph=True) runs the memory-saving path inside the graph, export runs torch's ops;
    both give the eager layer's outputs, gradients and running statistics."""
    gen = torch.Generator().manual_seed(21)
    eager = batchnorm.BatchNorm2d(4, activation="leaky_relu", memory_efficient=True)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5, generator=gen)
        eager.bias.uniform_(-0.5, 0.5, generator=gen)
    layer = batchnorm.BatchNorm2d(4, activation="leaky_relu", memory_efficient=True)
    layer.load_state_dict(eager.state_dict())
    x = torch.randn(5, 4, 3, 3, generator=gen)
    recorded = torch.compile(layer, fullgraph=True) if tool == "compile" else torch.export.export(layer, (x,)).module()
    for _ in range(2):  # the second call: running statistics already moved
        x = torch.randn(5, 4, 3, 3, generator=gen)
        xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ye = recorded(xr), eager(xe)
        assert_close(yr, ye, 1e-5, 1e-6, "output")
        dy = torch.randn(x.shape, generator=gen)
        (dxr,) = torch.autograd.grad(yr, xr, dy)
        (dxe,) = torch.autograd.grad(ye, xe, dy)
        assert_close(dxr, dxe, 1e-4, 1e-5, "dx")
    buffers = dict(recorded.named_buffers())
    for name, value in eager.named_buffers():
        key = name if name in buffers else f"_orig_mod.{name}"
        assert_close(buffers[key], value, 1e-6, 1e-7, name)


def test_memory_efficient_layer_compiled_refuses_a_zero_weight():
    layer = batchnorm.BatchNorm2d(3, activation="leaky_relu", memory_efficient=True)
    with torch.no_grad():
        layer.weight[1] = 0
    with pytest.raises(RuntimeError, match=r"every weight \(gamma\) must be non-zero"):
        torch.compile(layer, fullgraph=True)(torch.randn(2, 3, 2, 2))


def test_memory_efficient_double_backward_is_refused():
    layer = batchnorm.BatchNorm1d(3, memory_efficient=True, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


def test_residual_that_broadcasts_or_promotes_is_added_unfused_and_a_bad_one_is_refused():
    ours, _ = _pair((2, 3, 4, 4), "relu")
    x = torch.randn(2, 3, 4, 4)
    for r in (torch.randn(3, 1, 1), torch.randn(2, 3, 4, 4, dtype=torch.float64)):
        y_want, _ = reference.fused_forward(
            x.double().numpy(), ours.weight.detach().double().numpy(), ours.bias.detach().double().numpy(),
            ours.eps, np.broadcast_to(r.double().numpy(), x.shape), "relu",
        )  # fmt: skip
        assert_close(ours(x, r), y_want, 1e-5, 1e-5, f"residual {tuple(r.shape)}")
    with pytest.raises(ValueError, match=r"residual must broadcast to the input \(2, 3, 4, 4\), got \(2, 3, 4, 5\)"):
        ours(x, torch.randn(2, 3, 4, 5))


def test_fused_layer_keeps_a_plain_state_dict_and_says_what_it_fuses():
    layer = batchnorm.BatchNorm2d(3, activation=("leaky_relu", 0.2))
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    assert repr(layer).endswith("track_running_stats=True, activation=leaky_relu(0.2))")


# --- what is kept for the backward -------------------------------------------------------


# above the small-input threshold, so the automatic choice runs our kernels, not torch's
KEPT_SHAPE = (8, 16, 48, 48)


def test_bn_relu_keeps_at_most_55_percent_of_torchs():
    assert torch.Size(KEPT_SHAPE).numel() > SMALL_NUMEL
    x = torch.randn(KEPT_SHAPE, requires_grad=True)
    ours, theirs = batchnorm.BatchNorm2d(16, activation="relu"), nn.BatchNorm2d(16)
    ours_bytes = saved_bytes(lambda: ours(x))
    torch_bytes = saved_bytes(lambda: torch.relu(theirs(x)))
    assert ours_bytes <= 0.55 * torch_bytes, (ours_bytes, torch_bytes)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bn_add_relu_keeps_the_input_and_a_bit_mask(backend, channels_last):
    x, r = torch.randn(KEPT_SHAPE, requires_grad=True), torch.randn(KEPT_SHAPE, requires_grad=True)
    if channels_last:
        x, r = (t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (x, r))
    ours, theirs = batchnorm.BatchNorm2d(16, activation="relu"), nn.BatchNorm2d(16)
    with batchnorm.backend(backend):
        ours_bytes = saved_bytes(lambda: ours(x, r))
    torch_bytes = saved_bytes(lambda: torch.relu(theirs(x) + r))
    # x (4 bytes an element) + 1 bit, against torch's x + the output
    assert ours_bytes <= 0.52 * torch_bytes, (ours_bytes, torch_bytes)


def test_memory_efficient_leaky_relu_keeps_at_most_55_percent_of_torchs():
    conv = nn.Conv2d(16, 16, 1)
    x = torch.randn(8, 16, 12, 12)
    ours = batchnorm.BatchNorm2d(16, activation="leaky_relu", memory_efficient=True)
    theirs = nn.BatchNorm2d(16)
    conv_bytes = saved_bytes(lambda: conv(x.requires_grad_()))
    ours_bytes = saved_bytes(lambda: ours(conv(x))) - conv_bytes
    torch_bytes = saved_bytes(lambda: nn.functional.leaky_relu(theirs(conv(x)))) - conv_bytes
    assert ours_bytes <= 0.55 * torch_bytes, (ours_bytes, torch_bytes)


@pytest.mark.slow
def test_fused_layer_compiles_fullgraph():
    layer = batchnorm.BatchNorm2d(3, activation="relu")
    compiled = torch.compile(batchnorm.BatchNorm2d(3, activation="relu"), fullgraph=True, backend="aot_eager")
    x, r = torch.randn(4, 3, 5, 5, requires_grad=True), torch.randn(4, 3, 5, 5)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = layer(x, r), compiled(x2, r)
    y.sum().backward()
    y2.sum().backward()
    assert_close(y2, y, 1e-6, 1e-6, "output")
    assert_close(x2.grad, x.grad, 1e-5, 1e-5, "input grad")


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (8, 16, 48, 48)], ids=["small", "large"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", [None, ("leaky_relu", 0.1)], ids=["identity", "leaky"])
def test_inplace_writes_over_the_input_with_the_gradients_of_the_out_of_place_layer(shape, training, act):
    """As torch's module tests check ``inplace=True``: the input's version moves, the output and
    the input gradient are those of the out-of-place layer (in training from the output alone)."""
    out_of_place = batchnorm.BatchNorm2d(shape[1], activation=act).train(training)
    in_place = batchnorm.BatchNorm2d(shape[1], activation=act, inplace=True).train(training)
    with torch.no_grad():
        out_of_place.weight.uniform_(0.5, 1.5)
        out_of_place.running_var.uniform_(0.5, 2)
    in_place.load_state_dict(out_of_place.state_dict())
    x = torch.randn(shape, requires_grad=True)
    x_copy = x.detach().clone().requires_grad_()
    y = out_of_place(x)
    clone = x_copy.clone()
    version = clone._version
    y_in_place = in_place(clone)
    assert clone._version > version and y_in_place.data_ptr() == clone.data_ptr()
    assert_close(y_in_place, y, 1e-5, 1e-5, "output")
    g = torch.randn_like(y)
    y.backward(g)
    y_in_place.backward(g)
    assert_close(x_copy.grad, x.grad, 1e-4, 1e-4, "input grad")
    assert_close(in_place.weight.grad, out_of_place.weight.grad, 1e-3, 1e-4, "weight grad")
    with torch.no_grad():  # no autograd: written over the input in every mode
        z = torch.randn(shape)
        expected = out_of_place(z.clone())
        assert in_place(z).data_ptr() == z.data_ptr()
        assert_close(z, expected, 1e-5, 1e-5, "no-grad output over the input")


def test_inplace_in_training_needs_what_the_memory_saving_backward_needs():
    layer = batchnorm.BatchNorm2d(3, activation="relu", inplace=True)
    x = torch.randn(4, 3, 5, 5, requires_grad=True).clone()
    with pytest.raises(ValueError, match=r"inplace=True in training needs an invertible activation.*got relu"):
        layer(x)
    layer.eval()
    with torch.no_grad():  # eval needs no inverse
        assert layer(x).data_ptr() == x.data_ptr()
