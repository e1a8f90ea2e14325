"""Which path a call takes: torch's own ops under tools that cannot see our kernels, where the
registry's automatic choice is torch (small CPU inputs, every non-CPU device: GPU kernels are
opt-in); our kernels otherwise."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.autograd.forward_ad as forward_ad

import batchnorm
from batchnorm import _route, kernels
from batchnorm.activations import IDENTITY
from batchnorm.kernels.portable import TorchBackend


def test_tools_that_need_torch_ops_are_recognized():
    assert not _route.tool_needs_torch_ops()
    with forward_ad.dual_level():
        assert _route.tool_needs_torch_ops()
    seen = []
    torch.func.vmap(lambda x: seen.append(_route.tool_needs_torch_ops()) or x)(torch.randn(2, 3))
    torch.func.grad(lambda x: seen.append(_route.in_functorch_transform()) or x.sum())(torch.randn(3))
    assert seen == [True, True]

    def traced(x):
        seen.append(_route.tool_needs_torch_ops())
        return x * 2

    torch.jit.trace(traced, torch.randn(2), check_trace=False)
    assert seen[-1] is True


def test_small_cpu_calls_and_other_devices_take_torchs_kernel_unless_a_backend_is_forced():
    small, large = torch.randn(4, 3, 5, 5), torch.randn(2, 8, 130, 130)
    assert _route.runs_torch_ops(small, None, None, True) and not _route.runs_torch_ops(large, None, None, True)
    assert _route.runs_torch_ops(large, None, None, False)  # plain: torch's kernel up to 1M elements
    assert not _route.runs_torch_ops(torch.randn(2, 8, 300, 300), None, None, False)
    assert not _route.runs_torch_ops(small, None, None, False, memory_saving=True)  # only our path saves memory
    meta = torch.empty(2, 8, 130, 130, device="meta")  # stands for a GPU tensor: any device but the CPU
    assert _route.runs_torch_ops(meta, None, None, False)
    with batchnorm.backend("numba"):
        assert not _route.runs_torch_ops(small, None, None, False)
    with batchnorm.backend("torch"):
        assert not _route.runs_torch_ops(meta, None, None, False)
    assert "triton" not in kernels.AUTOMATIC_ORDER  # opt-in until it has passed the GPU check


class EagerBackend(TorchBackend):
    """A stand-in for a new automatic backend that takes every tensor, small ones included."""

    name = "eager-stand-in"
    calls: ClassVar[list[str]] = []

    def prefers(self, x, fused=False):
        return True

    def forward_train(self, x, weight, bias, eps, act=IDENTITY):
        self.calls.append("forward_train")
        return super().forward_train(x, weight, bias, eps, act)


def test_the_small_input_rule_is_the_registrys_so_a_new_backend_is_not_skipped(monkeypatch):
    monkeypatch.setattr(kernels, "AUTOMATIC_ORDER", ["eager-stand-in", *kernels.AUTOMATIC_ORDER])
    monkeypatch.setitem(kernels._FACTORIES, "eager-stand-in", f"{__name__}:EagerBackend")
    monkeypatch.delitem(kernels._INSTANCES, "eager-stand-in", raising=False)
    small = torch.randn(4, 3, 5, 5)
    assert not _route.runs_torch_ops(small, None, None, False)
    EagerBackend.calls.clear()
    batchnorm.BatchNorm2d(3)(small)
    assert EagerBackend.calls == ["forward_train"]
    kernels._INSTANCES.pop("eager-stand-in", None)


class TrainOnlyBackend(EagerBackend):
    """A stand-in that takes every training call and declines every eval call."""

    name = "train-only-stand-in"

    def prefers_eval(self, x, fused=False):
        return False

    def apply_act(self, x, scale, shift, residual=None, act=IDENTITY):
        self.calls.append("apply_act")
        return super().apply_act(x, scale, shift, residual, act)


def test_eval_asks_the_backends_eval_rule(monkeypatch):
    """The registry asks ``prefers_eval`` for an eval call (``prefers`` for training); a
    declined eval call runs torch's ops, whose eval result is torch's layer's."""
    monkeypatch.setattr(kernels, "AUTOMATIC_ORDER", ["train-only-stand-in", *kernels.AUTOMATIC_ORDER])
    monkeypatch.setitem(kernels._FACTORIES, "train-only-stand-in", f"{__name__}:TrainOnlyBackend")
    monkeypatch.delitem(kernels._INSTANCES, "train-only-stand-in", raising=False)
    x = torch.randn(4, 3, 5, 5)
    assert not _route.runs_torch_ops(x, None, None, False, training=True)
    assert _route.runs_torch_ops(x, None, None, False, training=False)
    layer, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    EagerBackend.calls.clear()
    layer(x), theirs(x)
    assert EagerBackend.calls == ["forward_train"]
    layer.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), theirs(x))
    assert EagerBackend.calls == ["forward_train"]  # no apply_act: eval went to torch's ops
    kernels._INSTANCES.pop("train-only-stand-in", None)


def test_a_layer_on_another_device_runs_torchs_ops():
    layer = batchnorm.BatchNorm2d(8, device="meta")
    y = layer(torch.empty(2, 8, 130, 130, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 8, 130, 130)
    layer.eval()
    assert layer(torch.empty(2, 8, 4, 4, device="meta")).shape == (2, 8, 4, 4)
