"""Conformance with torch.nn: torch's own BatchNorm test inputs (``module_db``),
its error inputs, and a ResNet-style client trained side by side."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.experiments.resnet import TinyResNet
from tests.helpers import assert_close, backends_fixture

each_backend = backends_fixture()

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules", reason="torch's test inputs need the expecttest package"
)

OURS = {
    nn.BatchNorm1d: batchnorm.BatchNorm1d,
    nn.BatchNorm2d: batchnorm.BatchNorm2d,
    nn.BatchNorm3d: batchnorm.BatchNorm3d,
}
INFOS = [info for info in common_modules.module_db if info.module_cls in OURS]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _cases():
    for info in INFOS:
        for dtype in (torch.float32, torch.float64):
            for training in (True, False):
                inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
                for index, module_input in enumerate(inputs):
                    desc = module_input.desc or "default"
                    yield pytest.param(info, dtype, training, index, id=f"{info.name}-{desc}-{dtype}-train{training}")


def test_module_db_has_the_batchnorm_entries():
    assert {info.module_cls for info in INFOS} == set(OURS)


@pytest.mark.parametrize("info,dtype,training,index", list(_cases()))
def test_torch_module_inputs(info, dtype, training, index):
    module_input = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)[
        index
    ]
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs, dtype=dtype)
    ours = OURS[info.module_cls](*args, **kwargs, dtype=dtype)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    atol = TOLERANCE[dtype]
    x_template = module_input.forward_input.args[0]
    if not training:  # give eval something learned to use
        warm = torch.randn(4, *x_template.shape[1:], dtype=dtype)
        theirs(warm), ours(warm)
    theirs.train(training), ours.train(training)
    for step in range(2):
        x = torch.randn_like(x_template) * 2 + step
        xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, yo = theirs(xt), ours(xo)
        assert_close(yo, yt, atol, atol, f"step {step} output")
        if yt.numel():
            grad = torch.randn_like(yt)
            yt.backward(grad)
            yo.backward(grad)
            assert_close(xo.grad, xt.grad, atol, atol, f"step {step} input grad")
            for (name, pt), po in zip(theirs.named_parameters(), ours.parameters(), strict=True):
                assert_close(po.grad, pt.grad, atol * 10, atol * 10, f"step {step} {name} grad")
    state_t, state_o = theirs.state_dict(), ours.state_dict()
    assert list(state_o) == list(state_t)
    for key in state_t:
        assert state_o[key].dtype == state_t[key].dtype, key
        assert_close(state_o[key], state_t[key], atol, atol, f"state_dict[{key}]")


def _error_cases():
    for info in INFOS:
        if info.module_error_inputs_func is None:
            continue
        errors = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        for index, _ in enumerate(errors):
            yield pytest.param(info, index, id=f"{info.name}-error{index}")


@pytest.mark.parametrize("info,index", list(_error_cases()))
def test_torch_error_inputs(info, index):
    # as torch's own test_errors does: a freshly constructed module, in its default (training) mode
    error = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False, training=True)[
        index
    ]
    spec = error.module_error_input
    ours = OURS[info.module_cls](*spec.constructor_input.args, **spec.constructor_input.kwargs)
    with pytest.raises(error.error_type, match=error.error_regex):
        ours(*spec.forward_input.args, **spec.forward_input.kwargs)


# --- a real client: a small ResNet trained side by side -------------------------------


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_resnet_client_trains_like_torch(memory_format):
    reference_model = TinyResNet().to(memory_format=memory_format)
    ours_model = batchnorm.convert(copy.deepcopy(reference_model))
    assert sum(isinstance(m, batchnorm.BatchNorm2d) for m in ours_model.modules()) == 11
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference_model, ours_model)]
    for step in range(3):
        x = torch.randn(6, 3, 12, 12).to(memory_format=memory_format)
        target = torch.randint(0, 5, (6,))
        losses = []
        for model, optimizer in zip((reference_model, ours_model), optimizers, strict=True):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], 1e-5, 1e-5, f"step {step} loss")
        for (name, p_ref), p_ours in zip(reference_model.named_parameters(), ours_model.parameters(), strict=True):
            assert_close(p_ours.grad, p_ref.grad, 1e-4, 1e-3, f"step {step} {name} grad")
        for optimizer in optimizers:
            optimizer.step()
    for key, value in reference_model.state_dict().items():
        assert_close(ours_model.state_dict()[key], value, 1e-4, 1e-4, key)
    reference_model.eval(), ours_model.eval()
    x = torch.randn(3, 3, 12, 12)
    assert_close(ours_model(x), reference_model(x), 1e-4, 1e-4, "eval logits")
