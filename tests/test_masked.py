"""Masked batch norm against torch's batch norm on the valid positions alone: outputs,
every gradient and the running statistics; padded positions give 0 and take no gradient."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import batchnorm
from batchnorm.kernels.cpu import backend as cpu_backend
from tests.helpers import assert_close, spy_on


def _valid_subset(x, mask):
    """The valid positions of (N, C, *) as a (count, C) batch, and how to scatter back."""
    moved = x.movedim(1, -1)  # (N, *, C)
    return moved[mask]  # (count, C)


@pytest.mark.parametrize(("shape", "channels_last"), [((4, 3, 7), False), ((3, 3, 4, 5), False),
                                                      ((3, 3, 4, 5), True), ((9, 3), False)], ids=str)  # fmt: skip
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("path", ["automatic", "numba-runs", "numba-selected", "torch", "torch-ops"])
def test_masked_training_is_batch_norm_over_the_valid_positions(shape, channels_last, momentum, path, monkeypatch):
    """Every form: the backends' masked stages (the numba kernels, on the mask's runs or on whole
    rows with a select, the torch backend's, and the automatic choice), and torch's ops (what
    tracers and export see)."""
    if path.startswith("numba-"):  # the ncl layout's two kernels, whatever the runs' length
        monkeypatch.setattr(cpu_backend, "MASKED_RUN_MIN", 0 if path == "numba-runs" else 1 << 30)
    if path == "torch-ops":
        monkeypatch.setattr(batchnorm._masked._route, "tool_needs_torch_ops", lambda: True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    mask = torch.rand((shape[0], *shape[2:]), generator=gen) < 0.6
    mask.view(-1)[:2] = True
    forced = {"numba-runs": "numba", "numba-selected": "numba", "torch": "torch"}.get(path)
    with batchnorm.backend(forced):
        _check_against_the_valid_subset(x, mask, momentum, gen)


def _check_against_the_valid_subset(x, mask, momentum, gen):
    shape = tuple(x.shape)
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}[len(shape)]
    ours = cls(3, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5, generator=gen)
        ours.bias.uniform_(-1, 1, generator=gen)
    theirs = nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    y = ours(x, mask=mask)
    assert y.stride() == x.stride()
    subset = _valid_subset(x.detach(), mask).requires_grad_()
    y_ref = theirs(subset)
    assert_close(_valid_subset(y, mask), y_ref, 1e-12, 1e-12, "y at valid positions")
    assert (y.movedim(1, -1)[~mask] == 0).all()
    dy = torch.randn(shape, dtype=torch.float64, generator=gen)
    dx, dw, db = torch.autograd.grad(y, (x, ours.weight, ours.bias), dy)
    dsub, dw_ref, db_ref = torch.autograd.grad(y_ref, (subset, theirs.weight, theirs.bias), _valid_subset(dy, mask))
    assert_close(_valid_subset(dx, mask), dsub, 1e-12, 1e-12, "dx at valid positions")
    assert (dx.movedim(1, -1)[~mask] == 0).all()
    assert_close(dw, dw_ref, 1e-12, 1e-12, "dweight")
    assert_close(db, db_ref, 1e-12, 1e-12, "dbias")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(getattr(ours, name), getattr(theirs, name), 1e-13, 1e-13, name)


def test_masked_eval_fused_relu_residual_and_nan_padding():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, generator=gen)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:], mask[2, 1:] = False, False
    x[~mask.unsqueeze(1).expand_as(x)] = float("nan")  # padding holding garbage
    residual = torch.randn(3, 4, 6, generator=gen)
    layer = batchnorm.BatchNorm1d(4, activation="relu")
    y = layer(x, residual, mask=mask)
    clean = torch.where(mask.unsqueeze(1), x, 0.0)
    subset = _valid_subset(clean, mask)
    plain = nn.BatchNorm1d(4)
    expected = torch.relu(plain(subset) + _valid_subset(residual, mask))
    assert_close(_valid_subset(y, mask), expected, 1e-5, 1e-5, "training")
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_mean).all()
    layer.eval(), plain.eval()
    y = layer(x, residual, mask=mask)
    expected = torch.relu(plain(subset) + _valid_subset(residual, mask))
    assert_close(_valid_subset(y, mask), expected, 1e-5, 1e-5, "eval")
    assert (y.movedim(1, -1)[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["numba-runs", "numba-selected", "torch"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_masked_fused_activation_sequences_and_nan_padding(backend, activation, monkeypatch):
    """Padded sequences (a valid prefix per sample) holding NaN: the activation inside the
    backends' masked stages, against torch's layer and activation on the valid subset."""
    if backend.startswith("numba-"):
        monkeypatch.setattr(cpu_backend, "MASKED_RUN_MIN", 0 if backend == "numba-runs" else 1 << 30)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, 9, dtype=torch.float64, generator=gen)
    mask = torch.arange(9)[None] < torch.tensor([9, 3, 1, 6, 0])[:, None]
    x = x.masked_fill(~mask.unsqueeze(1), float("nan")).requires_grad_()
    layer = batchnorm.BatchNorm1d(4, activation=activation, dtype=torch.float64)
    plain = nn.BatchNorm1d(4, dtype=torch.float64)
    torch_act = {"relu": torch.relu, "silu": nn.functional.silu}[activation]
    with batchnorm.backend(backend.split("-")[0]):
        y = layer(x, mask=mask)
    subset = _valid_subset(x.detach(), mask).requires_grad_()
    expected = torch_act(plain(subset))
    assert_close(_valid_subset(y, mask), expected, 1e-12, 1e-12, "y")
    assert (y.movedim(1, -1)[~mask] == 0).all()
    dy = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    dx, dw, db = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
    dsub, dw_ref, db_ref = torch.autograd.grad(expected, (subset, plain.weight, plain.bias), _valid_subset(dy, mask))
    assert_close(_valid_subset(dx, mask), dsub, 1e-11, 1e-11, "dx")
    assert (dx.movedim(1, -1)[~mask] == 0).all()
    assert_close(dw, dw_ref, 1e-11, 1e-11, "dweight")
    assert_close(db, db_ref, 1e-11, 1e-11, "dbias")
    assert_close(layer.running_var, plain.running_var, 1e-13, 1e-13, "running_var")


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_masked_gradients_and_double_backward_pass_gradcheck(backend):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.rand(4, 5, generator=gen) < 0.6
    mask[0, :2] = True

    def f(x, w, b):
        return batchnorm.functional.batch_norm(x, None, None, w, b, True, activation="silu", mask=mask)

    with batchnorm.backend(backend):
        assert torch.autograd.gradcheck(f, (x, w, b))
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_a_large_masked_batch_runs_the_kernels_unforced_and_equals_torch_on_the_subset(monkeypatch):
    """Large enough for the automatic choice to take the numba backend."""
    calls = spy_on(monkeypatch, type(batchnorm.kernels.get("numba")), "forward_train_masked", "backward_train_masked")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(32, 64, 200, generator=gen).requires_grad_()
    mask = torch.arange(200)[None] < torch.randint(1, 201, (32,), generator=gen)[:, None]
    layer = batchnorm.BatchNorm1d(64)
    assert batchnorm.kernels.select(x.detach(), fused=True).name == "numba"
    y = layer(x, mask=mask)
    plain = nn.BatchNorm1d(64)
    subset = _valid_subset(x.detach(), mask).requires_grad_()
    expected = plain(subset)
    torch.testing.assert_close(_valid_subset(y, mask), expected, rtol=1e-5, atol=1e-5)
    dy = torch.randn(x.shape, generator=gen)
    dx = torch.autograd.grad(y, x, dy)[0]
    dsub = torch.autograd.grad(expected, subset, _valid_subset(dy, mask))[0]
    torch.testing.assert_close(_valid_subset(dx, mask), dsub, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.running_var, plain.running_var)
    assert calls == ["forward_train_masked", "backward_train_masked"]


def test_mask_errors_name_what_was_expected():
    layer = batchnorm.BatchNorm1d(3)
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"without the channel dimension, \(2, 5\), got \(2, 3, 5\)"):
        layer(x, mask=torch.ones(2, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"must be a torch\.bool tensor"):
        layer(x, mask=torch.ones(2, 5))
    lonely = torch.zeros(2, 5, dtype=torch.bool)
    lonely[0, 0] = True
    with pytest.raises(ValueError, match="more than 1 valid value per channel"):
        layer(x, mask=lonely)
    assert int(layer.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="does not combine with memory_efficient"):
        batchnorm.BatchNorm1d(3, memory_efficient=True)(x, mask=torch.ones(2, 5, dtype=torch.bool))


def test_symbolic_trace_keeps_the_mask():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = batchnorm.BatchNorm1d(3)

        def forward(self, x, mask):
            return self.bn(x, mask=mask)

    net = Net()
    traced = fx.symbolic_trace(net)
    (call,) = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert "mask" in call.kwargs
    x, mask = torch.randn(2, 3, 5), torch.rand(2, 5) < 0.7
    mask[0, :2] = True
    torch.testing.assert_close(traced(x, mask), net(x, mask), rtol=1e-6, atol=1e-6)


class _MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = batchnorm.BatchNorm1d(3, activation="relu")

    def forward(self, x, mask, residual):
        return self.bn(x, residual, mask=mask)


def _state(module: nn.Module) -> dict:
    """Every parameter and buffer, non-persistent ones included."""
    return {name: t.detach().clone() for name, t in [*module.named_parameters(), *module.named_buffers()]}


def _restore(module: nn.Module, state: dict) -> None:
    """Put ``state`` back into a recorded module (whose names may carry a wrapper's prefix)."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            t.copy_(state[name.removeprefix("_orig_mod.")])


def _recorded(tool: str, net: nn.Module, args: tuple) -> nn.Module:
    """``net`` as ``tool`` records it from ``args`` (one mask); the recording may run it once."""
    if tool == "trace":
        return torch.jit.trace(net, args, check_trace=False)
    if tool == "export":
        return torch.export.export(net, args).module()
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    compiled(*args)
    return compiled


@pytest.mark.parametrize("tool", ["trace", "export", "compile"])
def test_a_recorded_masked_layer_counts_the_mask_of_each_call(tool):
    """Recorded with one mask, run with another: outputs, input gradients and running statistics are
    those of the eager layer on the new mask (the valid count is read from each call's mask)."""
    gen = torch.Generator().manual_seed(11)
    net = _MaskedNet()
    state = _state(net)
    x, residual = torch.randn(4, 3, 6, generator=gen), torch.randn(4, 3, 6, generator=gen)
    full = torch.ones(4, 6, dtype=torch.bool)
    recorded = _recorded(tool, net, (x, full, residual))
    _restore(recorded, state)
    eager = _MaskedNet()
    _restore(eager, state)
    mask = torch.arange(6) < torch.tensor([6, 4, 2, 5])[:, None]
    xt, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt, ye = recorded(xt, mask, residual), eager(xe, mask, residual)
    assert_close(yt, ye, 1e-6, 1e-6, "output")
    dy = torch.randn(ye.shape, generator=gen)
    assert_close(torch.autograd.grad(yt, xt, dy)[0], torch.autograd.grad(ye, xe, dy)[0], 1e-5, 1e-6, "dx")
    buffers = {name.removeprefix("_orig_mod."): t for name, t in recorded.named_buffers()}
    for name, value in eager.named_buffers():
        assert_close(buffers[name], value, 1e-6, 1e-7, name)


@pytest.mark.parametrize("tool", ["trace", "export", "compile"])
def test_a_recorded_masked_layer_never_learns_from_a_mask_with_one_valid_value(tool):
    """Compiled or exported, the layer raises as in eager; a trace cannot keep the check, so there the output is
    NaN and the running statistics are left as they were (counted as a non-finite batch)."""
    net = _MaskedNet()
    x, full = torch.randn(2, 3, 5), torch.ones(2, 5, dtype=torch.bool)
    recorded = _recorded(tool, net, (x, full, torch.zeros_like(x)))
    _restore(recorded, _state(_MaskedNet()))
    lonely = torch.zeros(2, 5, dtype=torch.bool)
    lonely[1, 3] = True
    if tool == "trace":
        y = recorded(x, lonely, torch.zeros_like(x))
        assert torch.isnan(y[1, :, 3]).all() and (y[0] == 0).all()
        buffers = {name.removeprefix("_orig_mod."): t for name, t in recorded.named_buffers()}
        assert (buffers["bn.running_mean"] == 0).all() and (buffers["bn.running_var"] == 1).all()
        assert int(buffers["bn.num_nonfinite_batches"]) == 1
        return
    with pytest.raises(RuntimeError, match="more than 1 valid value per channel"):
        recorded(x, lonely, torch.zeros_like(x))
