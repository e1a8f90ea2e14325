"""The layer in torch's own ops: our semantics (non-finite batches skipped, fused activation and
residual) around torch's kernel, scriptable and traceable."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from batchnorm import _torch_ops
from tests.helpers import assert_close, assert_same_gradients


def _buffers(channels=3):
    counter, nonfinite = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    return torch.zeros(channels), torch.ones(channels), counter, nonfinite


@pytest.mark.parametrize("skip_nonfinite", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_matches_torchs_layer(skip_nonfinite, momentum):
    theirs = nn.BatchNorm2d(3, momentum=momentum)
    mean, var, count, bad = _buffers()
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        r = torch.randn(4, 3, 5, 5)
        y = _torch_ops.batch_norm(x, mean, var, theirs.weight, theirs.bias, True, momentum, 1e-5, count,
                                  skip_nonfinite, bad, "relu", 0.0, r)  # fmt: skip
        assert_close(y, torch.relu(theirs(x) + r), 1e-5, 1e-5, "output")
    assert_close(mean, theirs.running_mean, 1e-6, 1e-6, "running_mean")
    assert_close(var, theirs.running_var, 1e-5, 1e-5, "running_var")
    assert int(count) == int(theirs.num_batches_tracked) == 3


def test_update_skips_a_nonfinite_batch_on_the_device():
    mean, var, count, bad = _buffers()
    x = torch.randn(4, 3, 5, 5)
    x[0, 1, 0, 0] = float("nan")
    _torch_ops.batch_norm(x, mean, var, None, None, True, 0.1, 1e-5, count, True, bad, "identity", 0.0, None)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))
    assert int(count) == 0 and int(bad) == 1


def test_scripts_and_traces_with_its_update():
    scripted = torch.jit.script(_torch_ops.batch_norm)
    mean, var, count, bad = _buffers()
    x = torch.randn(4, 3, 5, 5)
    y = scripted(x, mean, var, None, None, True, 0.1, 1e-5, count, True, bad, "leaky_relu", 0.2, None)
    assert_close(y, nn.functional.leaky_relu(nn.functional.batch_norm(x, None, None, training=True), 0.2),
                 1e-5, 1e-5, "scripted")  # fmt: skip
    assert int(count) == 1 and mean.abs().sum() > 0

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in zip(("mean", "var", "count", "bad"), _buffers(), strict=True):
                self.register_buffer(name, t)

        def forward(self, x):
            return _torch_ops.batch_norm(x, self.mean, self.var, None, None, True, 0.1, 1e-5, self.count, True,
                                         self.bad, "identity", 0.0, None)  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's own notice
        traced = torch.jit.trace(Holder(), x, check_trace=False)
    kinds = {node.kind() for node in traced.graph.nodes()}
    assert "aten::batch_norm" in kinds and "aten::var_mean" in kinds and "aten::add_" in kinds  # the update too
    traced(x * 2 + 1)
    assert int(traced.count) == 2 and traced.mean.mean() > 0.1


@pytest.mark.parametrize("activation", ["identity", "relu", "leaky_relu", "elu", "silu"])
def test_a_traced_layer_trains_step_after_step_like_the_eager_one(activation):
    """TorchScript optimizes a traced graph on its second run and differentiates it from the third: five
    training steps, each with a backward, give the eager layer's outputs, gradients and running statistics
    (a traced native_batch_norm followed by SiLU used to fail at the third)."""
    import batchnorm

    gen = torch.Generator().manual_seed(8)
    eager = batchnorm.BatchNorm1d(4, activation=activation)
    layer = batchnorm.BatchNorm1d(4, activation=activation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace's own notice
        traced = torch.jit.trace(layer, torch.randn(6, 4, 5, generator=gen), check_trace=False)
    with torch.no_grad():  # the trace ran the layer once: start both from the same buffers
        for (_, t), (_, want) in zip(traced.named_buffers(), eager.named_buffers(), strict=True):
            t.copy_(want)
    for _ in range(5):
        x = torch.randn(6, 4, 5, generator=gen) * 2 + 1
        xt, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yt, ye = traced(xt), eager(xe)
        assert_close(yt, ye, 1e-5, 1e-6, "output")
        dy = torch.randn(ye.shape, generator=gen)
        assert_same_gradients(yt, (xt, traced.weight, traced.bias), ye, (xe, eager.weight, eager.bias), dy,
                              1e-4, 1e-5)  # fmt: skip
    for (name, t), (_, want) in zip(traced.named_buffers(), eager.named_buffers(), strict=True):
        assert_close(t, want, 1e-6, 1e-7, name)
