"""torch's generic module checks (those of torch's ``TestModule``) on our classes, driven by torch's
own BatchNorm entries in ``module_db``: forward and dtype methods, factory kwargs, repr, pickle,
inplace, non-contiguous inputs, gradcheck and gradgradcheck of every partial derivative, memory
formats of outputs and gradients, the meta device, and the error inputs. Each runs with the
automatic backend choice and with the torch and numba backends forced."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close, backends_fixture

each_backend = backends_fixture()
common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules", reason="torch's test inputs need the expecttest package"
)

OURS = {nn.BatchNorm1d: batchnorm.BatchNorm1d, nn.BatchNorm2d: batchnorm.BatchNorm2d,
        nn.BatchNorm3d: batchnorm.BatchNorm3d}  # fmt: skip
INFOS = [info for info in common_modules.module_db if info.module_cls in OURS]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _inputs(info, dtype, training, requires_grad=False):
    return [
        mi for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                             training=training)
        if mi.forward_input is not None
    ]  # fmt: skip


def _build(info, module_input, dtype, training) -> nn.Module:
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    return OURS[info.module_cls](*args, **kwargs).to(dtype).train(training)


def _cases(dtypes=(torch.float32, torch.float64)):
    for info, dtype, training in itertools.product(INFOS, dtypes, (True, False)):
        yield pytest.param(info, dtype, training, id=f"{info.name}-{str(dtype)[6:]}-{'train' if training else 'eval'}")


def _assert_placed(module: nn.Module, dtype: torch.dtype, device="cpu"):
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device == torch.device(device), f"{name} on {t.device}"
        if t.is_floating_point():
            assert t.dtype == dtype, f"{name} is {t.dtype}, expected {dtype}"


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases()))
def test_forward_and_dtype_methods(info, dtype, training):
    for mi in _inputs(info, dtype, training):
        m = _build(info, mi, dtype, training)
        out = m(*mi.forward_input.args, **mi.forward_input.kwargs)
        if mi.reference_fn is not None:
            assert_close(out, mi.reference_fn(m, *mi.forward_input.args), TOL[dtype], TOL[dtype], "reference_fn")
        (m.float() if dtype == torch.float32 else m.double())(*mi.forward_input.args)
        _assert_placed(m, dtype)


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases()))
def test_factory_kwargs_and_meta_device(info, dtype, training):
    for mi in _inputs(info, dtype, training):
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        _assert_placed(OURS[info.module_cls](*args, **kwargs, device="cpu", dtype=dtype), dtype)
        with torch.device("meta"):
            meta = OURS[info.module_cls](*args, **kwargs)
        cpu = OURS[info.module_cls](*args, **kwargs)
        for a, b in zip([*meta.parameters(), *meta.buffers()], [*cpu.parameters(), *cpu.buffers()], strict=True):
            assert a.is_meta and (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride())


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases()))
def test_repr_and_pickle(info, dtype, training):
    for mi in _inputs(info, dtype, training):
        m = _build(info, mi, dtype, training)
        assert repr(m).startswith(info.module_cls.__name__) and str(m)
        before = copy.deepcopy(m)
        out = m(*mi.forward_input.args)
        buffer = io.BytesIO()
        torch.save(before, buffer)
        buffer.seek(0)
        assert_close(torch.load(buffer, weights_only=False)(*mi.forward_input.args), out, 0, 0, "unpickled")


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases()))
def test_inplace_gives_the_out_of_place_result(info, dtype, training):
    for mi in _inputs(info, dtype, training, requires_grad=True):
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        out_of_place = OURS[info.module_cls](*args, **kwargs, inplace=False).to(dtype).train(training)
        in_place = OURS[info.module_cls](*args, **kwargs, inplace=True).to(dtype).train(training)
        x = mi.forward_input.args[0]
        version = x._version
        expected = out_of_place(x)
        assert x._version == version  # out of place leaves the input alone
        x_copy = x.detach().clone().requires_grad_()
        clone = x_copy.clone()
        version = clone._version
        got = in_place(clone)
        assert clone._version > version
        assert_close(got, expected, TOL[dtype], TOL[dtype], "in place")
        g = torch.randn_like(expected)
        expected.backward(g)
        got.backward(g)
        assert_close(x_copy.grad, x.grad, 1e3 * TOL[dtype], 1e3 * TOL[dtype], "input grad")


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases()))
def test_non_contiguous_inputs(info, dtype, training):
    for mi in _inputs(info, dtype, training, requires_grad=True):
        m = _build(info, mi, dtype, training)
        x = mi.forward_input.args[0]
        state = copy.deepcopy(m.state_dict())
        reference = m(x)
        g = torch.randn_like(reference)
        reference.backward(g)
        ref_grads = [x.grad, *(p.grad for p in m.parameters())]
        for x_in, g_in in itertools.product((x, _non_contiguous(x)), (g, _non_contiguous(g))):
            m.load_state_dict(state)
            m.zero_grad()
            x_in = x_in.detach().requires_grad_()
            out = m(x_in)
            out.backward(g_in)
            assert_close(out, reference, TOL[dtype], TOL[dtype], "output")
            for got, want in zip([x_in.grad, *(p.grad for p in m.parameters())], ref_grads, strict=True):
                assert_close(got, want, 1e-4, 0, "grad")


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases(dtypes=(torch.float64,))))
@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=["grad", "gradgrad"])
def test_gradients_total_and_partial(info, dtype, training, check):
    for mi in _inputs(info, dtype, training, requires_grad=True):
        m = _build(info, mi, dtype, training)
        x = mi.forward_input.args[0]
        params = list(m.parameters())

        names = [n for n, _ in m.named_parameters()]

        def fn(x, *values, m=m, names=names):  # the training output does not depend on the running statistics
            return torch.func.functional_call(m, dict(zip(names, values, strict=True)), (x,))

        assert check(fn, (x, *params), fast_mode=check is torch.autograd.gradgradcheck)
        for p in params:  # each parameter alone (torch's fast mode: random projections of the Jacobian)
            others = [q.detach() if q is not p else q for q in params]
            assert check(fn, (x.detach(), *others), fast_mode=True)


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases()))
def test_memory_formats_of_outputs_and_gradients(info, dtype, training):
    for mi in _inputs(info, dtype, training, requires_grad=True):
        x = mi.forward_input.args[0]
        if x.dim() not in (4, 5):
            continue
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        m = _build(info, mi, dtype, training)
        state = copy.deepcopy(m.state_dict())
        expected = m(x)
        g = torch.rand_like(expected)
        ref = torch.autograd.grad(expected, [x, *m.parameters()], g) if training else None
        for in_fmt, module_fmt in itertools.product((torch.contiguous_format, fmt),
                                                    (torch.preserve_format, torch.contiguous_format, fmt)):  # fmt: skip
            m.load_state_dict(state)
            m.to(memory_format=module_fmt)
            x_in = x.detach().clone().to(memory_format=in_fmt).requires_grad_()
            out = m(x_in)
            assert_close(out, expected, TOL[dtype], TOL[dtype], f"{in_fmt}, module {module_fmt}")
            assert out.is_contiguous(memory_format=in_fmt)
            if training:
                grads = torch.autograd.grad(out, [x_in, *m.parameters()], g.to(memory_format=in_fmt))
                assert grads[0].is_contiguous(memory_format=in_fmt)
                for got, want in zip(grads, ref, strict=True):
                    assert_close(got, want, 1e-4, 1e-4, "grad")


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_train_and_eval_differ_as_torch_says(info):
    for mi in _inputs(info, torch.float32, True):
        m = _build(info, mi, torch.float32, True)
        del m.training
        with pytest.raises(AttributeError, match="'training'"):
            m(*mi.forward_input.args)
    assert info.train_and_eval_differ


@pytest.mark.parametrize(("info", "dtype", "training"), list(_cases()))
def test_error_inputs(info, dtype, training):
    if info.module_error_inputs_func is None:
        pytest.skip(f"torch has no error inputs for {info.name}")
    for error in info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                               training=training):  # fmt: skip
        mi = error.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        if error.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                OURS[info.module_cls](*args, **kwargs)
        else:
            m = OURS[info.module_cls](*args, **kwargs)
            with pytest.raises(error.error_type, match=error.error_regex):
                m(*mi.forward_input.args, **mi.forward_input.kwargs)
