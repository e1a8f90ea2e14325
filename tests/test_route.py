"""Which path a call takes: torch's own ops under tools that cannot see our kernels, on small CPU
inputs and on every non-CPU device (GPU kernels opt-in); our kernels otherwise."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad

import batchnorm
from batchnorm import _route, kernels


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
    assert _route.prefers_torch_kernel(small, None, None) and not _route.prefers_torch_kernel(large, None, None)
    meta = torch.empty(2, 8, 130, 130, device="meta")  # stands for a GPU tensor: any device but the CPU
    assert _route.prefers_torch_kernel(meta, None, None)
    with batchnorm.backend("numba"):
        assert not _route.prefers_torch_kernel(small, None, None)
    with batchnorm.backend("torch"):
        assert not _route.prefers_torch_kernel(meta, None, None)
    assert "triton" not in kernels.AUTOMATIC_ORDER  # opt-in until it has passed the GPU check


def test_a_layer_on_another_device_runs_torchs_ops():
    layer = batchnorm.BatchNorm2d(8, device="meta")
    y = layer(torch.empty(2, 8, 130, 130, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 8, 130, 130)
    layer.eval()
    assert layer(torch.empty(2, 8, 4, 4, device="meta")).shape == (2, 8, 4, 4)
