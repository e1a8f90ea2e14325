"""``batchnorm.functional``: autograd, validation, running statistics, compile/export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
from batchnorm import functional as F
from batchnorm import reference
from tests.helpers import assert_close


def _params(c, dtype=torch.float64):
    return (torch.randn(c, dtype=dtype, requires_grad=True), torch.randn(c, dtype=dtype, requires_grad=True))


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4), (2, 3, 2, 3), (2, 2, 2, 1, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck_training(shape, affine):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, b = _params(shape[1]) if affine else (None, None)
    inputs = (x, w, b) if affine else (x,)

    def f(x, w=None, b=None):
        return F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 2, 3)])
def test_gradcheck_and_gradgradcheck_eval(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w, b = _params(shape[1])
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64) + 0.5

    def f(x, w, b):
        return F.batch_norm(x, rm, rv, w, b, training=False)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_gradcheck_channels_last_input():
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    w, b = _params(3)
    assert gradcheck(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), (x, w, b))


def test_matches_reference_including_running_update(rng):
    x = rng.normal(2, 3, size=(6, 4, 5))
    w, b = rng.normal(size=4), rng.normal(size=4)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    y = F.batch_norm(torch.tensor(x), rm, rv, torch.tensor(w), torch.tensor(b), True, 0.3, 1e-5)
    y_ref, cache = reference.forward(x, w, b, 1e-5)
    rm_ref, rv_ref, _ = reference.update_running(np.zeros(4), np.ones(4), cache.mean, cache.var, 30, 0.3, 0)
    assert_close(y, y_ref, 1e-12, 1e-12, "y")
    assert_close(rm, rm_ref, 1e-12, 1e-12, "running_mean")
    assert_close(rv, rv_ref, 1e-12, 1e-12, "running_var")


def test_eval_equals_inference_affine():
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    w, b = torch.randn(3), torch.randn(3)
    x = torch.randn(4, 3, 5)
    scale, shift = F.inference_affine(rm, rv, w, b, 1e-5)
    assert_close(F.batch_norm(x, rm, rv, w, b, False), x * scale[:, None] + shift[:, None], 1e-6, 1e-6, "eval")
    assert_close(
        F.batch_norm(x, rm, rv, w, b, False), torch.nn.functional.batch_norm(x, rm, rv, w, b, False), 1e-6, 1e-6
    )


# --- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: F.batch_norm(torch.randn(3), None, None, training=True), ValueError, "at least 2 dims, got 1D"),
        (lambda: F.batch_norm(torch.ones(4, 3, dtype=torch.long), None, None, training=True),
         NotImplementedError, "floating-point input.*got torch.int64"),
        (lambda: F.batch_norm(torch.ones(4, 3, dtype=torch.complex64), None, None, training=True),
         ValueError, "got torch.complex64"),
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(4), torch.ones(4), training=True),
         RuntimeError, "running_mean should contain 3 elements not 4"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, torch.ones(2), training=True),
         ValueError, "weight should contain 3 elements not 2"),
        (lambda: F.batch_norm(torch.randn(1, 3), None, None, training=True),
         ValueError, r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0),
         ValueError, "eps must be positive during training, but got 0"),
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), eps=-1.0),
         ValueError, "eps must be non-negative, but got -1.0"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=False),
         ValueError, "running_mean and running_var must be given"),
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3, dtype=torch.float64), torch.ones(3), training=True),
         RuntimeError, "mixed dtype: input is torch.float32"),
        (lambda: F.batch_norm(torch.randn(4, 3, dtype=torch.float64), None, None, torch.ones(3), training=True),
         ValueError, "expected all torch.float64"),
    ],
)  # fmt: skip
def test_bad_input_raises_a_message_naming_expected_and_actual(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_bad_input_leaves_running_statistics_untouched():
    rm, rv, nbt = torch.randn(3), torch.rand(3) + 1, torch.tensor(5)
    before = (rm.clone(), rv.clone(), nbt.clone())
    with pytest.raises(ValueError):
        F.batch_norm(torch.randn(1, 3), rm, rv, training=True, num_batches_tracked=nbt)
    for a, b in zip((rm, rv, nbt), before, strict=True):
        assert torch.equal(a, b)


# --- running statistics ------------------------------------------------------------


def test_nonfinite_batch_is_skipped_and_counted():
    rm, rv = torch.zeros(3), torch.ones(3)
    nbt, skipped = torch.tensor(0), torch.tensor(0)
    good = torch.randn(8, 3)
    F.batch_norm(good, rm, rv, training=True, num_batches_tracked=nbt, nonfinite_count=skipped)
    after_good = (rm.clone(), rv.clone())
    bad = torch.randn(8, 3)
    bad[2, 1] = float("nan")
    y = F.batch_norm(bad, rm, rv, training=True, num_batches_tracked=nbt, nonfinite_count=skipped)
    assert torch.isnan(y[:, 1]).all()  # the output is honest about the bad channel
    assert torch.equal(rm, after_good[0]) and torch.equal(rv, after_good[1])
    assert int(nbt) == 1 and int(skipped) == 1
    inf = torch.randn(8, 3)
    inf[0, 0] = float("inf")
    F.batch_norm(inf, rm, rv, training=True, num_batches_tracked=nbt, nonfinite_count=skipped)
    assert int(skipped) == 2 and torch.isfinite(rm).all() and torch.isfinite(rv).all()


def test_skip_nonfinite_false_restores_torch_behaviour():
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    bad = torch.randn(8, 3)
    bad[2, 1] = float("nan")
    F.batch_norm(bad, rm, rv, training=True, num_batches_tracked=nbt, skip_nonfinite=False)
    trm, trv = torch.zeros(3), torch.ones(3)
    torch.nn.functional.batch_norm(bad, trm, trv, training=True)
    assert torch.isnan(rm[1]) and torch.isnan(rv[1]) and int(nbt) == 1
    assert_close(rm, trm, 1e-6, 1e-6, "running_mean")


def test_cumulative_average_with_momentum_none(rng):
    rm, rv, nbt = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.tensor(0)
    batches = [rng.normal(i, 1 + i, size=(5, 2)) for i in range(4)]
    for x in batches:
        F.batch_norm(torch.tensor(x), rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    assert_close(rm, np.mean([x.mean(0) for x in batches], axis=0), 1e-12, 1e-12, "cumulative mean")
    assert_close(rv, np.mean([x.var(0, ddof=1) for x in batches], axis=0), 1e-12, 1e-12, "cumulative var")


def test_momentum_none_needs_a_batch_counter():
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_keeps_float32_statistics(dtype):
    x = torch.randn(16, 4, 3).to(dtype)
    rm, rv = torch.zeros(4), torch.ones(4)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    y = F.batch_norm(x, rm, rv, w, b, training=True)
    y.float().sum().backward()
    assert y.dtype == dtype and rm.dtype == torch.float32 and w.grad.dtype == torch.float32
    y_ref, cache = reference.forward(x.double().numpy(), w.detach().double().numpy(), b.detach().double().numpy())
    assert_close(y, y_ref, 3e-2, 3e-2, "y")
    assert_close(rm, 0.1 * cache.mean, 1e-5, 1e-4, "running_mean")


# --- torch.library ops, compile and export -----------------------------------------


@pytest.mark.parametrize("op,args", [
    ("forward_train", lambda: (torch.randn(4, 3, 5, requires_grad=True), torch.randn(3, requires_grad=True),
                               torch.randn(3, requires_grad=True), 1e-5)),
    ("affine", lambda: (torch.randn(4, 3, 2, 2).to(memory_format=torch.channels_last).requires_grad_(),
                        torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True))),
    ("backward_train", lambda: (torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.randn(3), torch.rand(3) + 1,
                                torch.randn(3))),
    ("affine_backward", lambda: (torch.randn(4, 3, 5), torch.randn(4, 3, 5))),
])  # fmt: skip
def test_custom_ops_pass_opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.batchnorm, op).default, args())


@pytest.mark.slow
@pytest.mark.parametrize("momentum,compiler", [(0.1, "aot_eager"), (None, "aot_eager"), (None, "inductor")])
def test_compile_fullgraph_matches_eager(momentum, compiler):
    eager, compiled_module = batchnorm.BatchNorm2d(3, momentum=momentum), batchnorm.BatchNorm2d(3, momentum=momentum)
    compiled = torch.compile(compiled_module, fullgraph=True, backend=compiler)
    for _ in range(2):
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = eager(x), compiled(x2)
        g = torch.randn_like(y)  # not y itself: d(sum(y^2))/dx cancels to ~eps/var of its terms
        y.backward(g)
        y2.backward(g)
        assert_close(y2, y, 1e-6, 1e-5, "y")
        assert_close(x2.grad, x.grad, 1e-6, 1e-5, "dx")
    assert_close(compiled_module.running_var, eager.running_var, 1e-6, 1e-6, "running_var")
    assert int(compiled_module.num_batches_tracked) == 2


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_gives_plain_aten_ops(training):
    """An exported program holds torch's own batch-norm ops, so it runs (and exports to ONNX)
    where this package is not installed; after run_decompositions, core aten ops only."""
    module = batchnorm.BatchNorm2d(3, activation="relu").train(training)
    reference = nn.BatchNorm2d(3).train(training)
    batch = torch.export.Dim("batch", min=2)
    x = torch.randn(4, 3, 5, 5)
    program = torch.export.export(module, (x,), dynamic_shapes=({0: batch},))
    for decomposed in (program, program.run_decompositions()):
        targets = [str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"]
        assert not [t for t in targets if t.startswith("batchnorm.")], targets
        assert any("batch_norm" in t for t in targets), targets
    x = torch.randn(6, 3, 5, 5)
    assert_close(program.module()(x), torch.relu(reference(x)), 1e-5, 1e-5, "exported output")


def test_empty_inputs_behave_as_torchs():
    """torch returns an empty input's empty output whatever its dtype, dimensions and layout."""
    layer, theirs = batchnorm.BatchNorm2d(3), nn.BatchNorm2d(3)
    empty64 = torch.empty(0, 3, 4, 4, dtype=torch.float64)
    assert layer(empty64).dtype == theirs(empty64).dtype == torch.float64
    assert int(layer.num_batches_tracked) == int(theirs.num_batches_tracked) == 1  # counted, as torch does
    empty_cl = torch.empty(0, 3, 4, 4).to(memory_format=torch.channels_last)
    assert layer(empty_cl).stride() == theirs(empty_cl).stride() == empty_cl.stride()
    one_d = torch.empty(0)
    expected = nn.functional.batch_norm(one_d, None, None, training=True)
    assert F.batch_norm(one_d, None, None, training=True).shape == expected.shape == (0,)
    with pytest.raises(ValueError, match="at least 2 dims"):
        F.batch_norm(torch.randn(5), None, None, training=True)
