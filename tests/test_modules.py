"""BatchNorm1d/2d/3d against torch.nn on the same inputs: every piece of semantics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close, backends_fixture

each_backend = backends_fixture()

PAIRS = [
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 4)),
    (batchnorm.BatchNorm1d, nn.BatchNorm1d, (5, 4, 3)),
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 2)),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 3)),
]


def _twins(ours_cls, torch_cls, **kwargs):
    theirs = torch_cls(4, **kwargs)
    ours = ours_cls(4, **kwargs)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.normal_()
            ours.weight.copy_(theirs.weight)
        if theirs.bias is not None:
            theirs.bias.normal_()
            ours.bias.copy_(theirs.bias)
    return ours, theirs


def _step_both(ours, theirs, x, atol=1e-5):
    """One forward+backward on both; compare outputs, gradients and buffers."""
    xo, xt = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    yo, yt = ours(xo), theirs(xt)
    assert yo.dtype == yt.dtype and yo.shape == yt.shape
    assert yo.stride() == yt.stride(), "memory format differs from torch's"
    assert_close(yo, yt, atol, atol, "output")
    if yt.numel():
        g = torch.randn_like(yt)
        yo.backward(g)
        yt.backward(g)
        assert_close(xo.grad, xt.grad, atol, atol, "input grad")
        for name in ("weight", "bias"):
            po, pt = getattr(ours, name), getattr(theirs, name)
            if pt is not None:
                assert_close(po.grad, pt.grad, atol * 10, atol * 10, f"{name} grad")
    _same_state(ours, theirs, atol)


def _same_state(ours, theirs, atol=1e-6):
    so, st = ours.state_dict(), theirs.state_dict()
    assert list(so) == list(st)
    for key in st:
        assert so[key].dtype == st[key].dtype, key
        assert_close(so[key], st[key], atol, atol, key)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, 0.7, None])
def test_training_steps_then_eval_match_torch(ours_cls, torch_cls, shape, momentum):
    ours, theirs = _twins(ours_cls, torch_cls, momentum=momentum)
    for _ in range(3):
        _step_both(ours, theirs, torch.randn(shape) * 3 + 1)
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), theirs.eval()
    _step_both(ours, theirs, torch.randn(shape))


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS)
@pytest.mark.parametrize(
    "kwargs",
    [dict(affine=False), dict(bias=False), dict(track_running_stats=False),
     dict(affine=False, track_running_stats=False), dict(eps=1e-2)],
)  # fmt: skip
def test_options_match_torch(ours_cls, torch_cls, shape, kwargs):
    ours, theirs = _twins(ours_cls, torch_cls, **kwargs)
    assert repr(ours) == repr(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    for training in (True, False):
        ours.train(training), theirs.train(training)
        _step_both(ours, theirs, torch.randn(shape) + 2)


def test_track_running_stats_flipped_after_construction():
    ours, theirs = _twins(batchnorm.BatchNorm2d, nn.BatchNorm2d)
    _step_both(ours, theirs, torch.randn(4, 4, 3, 3))
    ours.track_running_stats = theirs.track_running_stats = False
    _step_both(ours, theirs, torch.randn(4, 4, 3, 3) * 5)  # batch stats, buffers frozen
    assert int(ours.num_batches_tracked) == 1
    ours.eval(), theirs.eval()
    _step_both(ours, theirs, torch.randn(4, 4, 3, 3))  # eval uses the stored buffers


def test_isinstance_state_dict_repr_and_dtypes_are_torchs():
    ours = batchnorm.BatchNorm2d(3)
    assert isinstance(ours, nn.BatchNorm2d) and isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert repr(ours) == repr(nn.BatchNorm2d(3))
    assert list(ours.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    assert ours._version == nn.BatchNorm2d._version
    ours.half()
    assert ours.num_batches_tracked.dtype == torch.int64 and ours.weight.dtype == torch.float16
    assert ours.num_nonfinite_batches.dtype == torch.int64
    assert "skip_nonfinite=False" in repr(batchnorm.BatchNorm2d(3, skip_nonfinite=False))


def test_state_dict_round_trips_with_torch_both_ways():
    theirs = nn.BatchNorm2d(3)
    theirs(torch.randn(4, 3, 2, 2))
    ours = batchnorm.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    _same_state(ours, theirs, 0)
    back = nn.BatchNorm2d(3)
    back.load_state_dict(ours.state_dict())
    _same_state(back, theirs, 0)


def test_old_checkpoint_without_num_batches_tracked_loads():
    ours = batchnorm.BatchNorm1d(3)
    old = {k: v for k, v in nn.BatchNorm1d(3).state_dict().items() if k != "num_batches_tracked"}
    ours._version = 2
    state = dict(old)
    state_with_meta = type(ours.state_dict())(state)
    state_with_meta._metadata = {"": {"version": 1}}
    ours.load_state_dict(state_with_meta)
    assert int(ours.num_batches_tracked) == 0


def test_reset_running_stats_and_parameters():
    ours = batchnorm.BatchNorm1d(3)
    bad = torch.randn(4, 3)
    bad[0, 0] = float("nan")
    ours(torch.randn(4, 3) * 4 + 2)
    ours(bad)
    assert int(ours.num_nonfinite_batches) == 1
    with torch.no_grad():
        ours.weight.fill_(3)
    ours.reset_parameters()
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))
    assert int(ours.num_batches_tracked) == 0 and int(ours.num_nonfinite_batches) == 0
    assert torch.equal(ours.weight, torch.ones(3))


def test_eval_uses_running_statistics_not_the_batch():
    ours = batchnorm.BatchNorm1d(2, eps=0.0).eval()  # eval accepts eps == 0
    with torch.no_grad():
        ours.running_mean.copy_(torch.tensor([1.0, -2.0]))
        ours.running_var.copy_(torch.tensor([4.0, 0.25]))
    y = ours(torch.tensor([[1.0, -2.0], [3.0, -1.5]]))
    assert_close(y, [[0.0, 0.0], [1.0, 1.0]], 1e-5, 1e-5, "eval")


def test_empty_batch_counts_but_does_not_change_statistics():
    ours, theirs = _twins(batchnorm.BatchNorm2d, nn.BatchNorm2d)
    _step_both(ours, theirs, torch.randn(0, 4, 3, 3))
    assert int(ours.num_batches_tracked) == 1
    assert torch.equal(ours.running_mean, torch.zeros(4))


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_mixed_precision_input_with_float32_parameters(dtype, atol):
    ours, theirs = _twins(batchnorm.BatchNorm2d, nn.BatchNorm2d)
    x = torch.randn(4, 4, 3, 3).to(dtype)
    _step_both(ours, theirs, x, atol)
    assert ours.running_mean.dtype == torch.float32 and ours.weight.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(torch.randn(4, 4, 3, 3).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("ours_cls,torch_cls,shape,fmt", [
    (batchnorm.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 2), torch.channels_last),
    (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 2, 3), torch.channels_last_3d),
])  # fmt: skip
def test_channels_last_in_channels_last_out(ours_cls, torch_cls, shape, fmt):
    ours, theirs = _twins(ours_cls, torch_cls)
    x = torch.randn(shape).to(memory_format=fmt)
    _step_both(ours, theirs, x)
    ours.eval(), theirs.eval()
    _step_both(ours, theirs, x)
    assert ours(x).is_contiguous(memory_format=fmt)


def test_non_contiguous_input_gives_contiguous_output():
    ours, theirs = _twins(batchnorm.BatchNorm2d, nn.BatchNorm2d)
    x = torch.randn(3, 5, 4, 6).transpose(1, 2)[:, :, ::2]  # (3, 4, 3, 6), strided
    assert not x.is_contiguous()
    _step_both(ours, theirs, x)
    ours.eval(), theirs.eval()
    _step_both(ours, theirs, x)


def test_nonfinite_batch_does_not_poison_running_statistics():
    ours = batchnorm.BatchNorm2d(4)
    ours(torch.randn(4, 4, 3, 3))
    saved = copy.deepcopy(ours.state_dict())
    bad = torch.randn(4, 4, 3, 3)
    bad[1, 2, 0, 0] = float("inf")
    ours(bad)
    for key, value in saved.items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert int(ours.num_nonfinite_batches) == 1
    torch_like = batchnorm.BatchNorm2d(4, skip_nonfinite=False)
    torch_like(bad)
    assert not torch.isfinite(torch_like.running_var).all()


def test_finite_batch_whose_variance_overflows_is_skipped_not_an_error(each_backend):
    """Values near float32's largest: the batch variance overflows to inf (invstd 0). Its
    running update is skipped as non-finite (not a ZeroDivisionError); where torch's kernel
    runs, the output is torch's. (Our kernels' shifted sums overflow too, giving NaN where
    torch's float64 accumulation gives 0: neither is the normalized value, 1.22.)"""
    x = torch.ones(3, 2)
    x[0, 0], x[1, 0] = 3e38, -3e38
    ours = batchnorm.BatchNorm1d(2)
    saved = copy.deepcopy(ours.state_dict())
    y = ours(x)
    for key, value in saved.items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert int(ours.num_nonfinite_batches) == 1
    if each_backend != "numba":
        torch.testing.assert_close(y, nn.BatchNorm1d(2)(x))


def test_large_mean_variance_is_stable_in_float32():
    x64 = torch.randn(16, 3, 8, 8, dtype=torch.float64) + 1e4
    ours = batchnorm.BatchNorm2d(3, momentum=1.0)
    ours(x64.float())
    expected = x64.float().double().var(dim=(0, 2, 3))  # unbiased, as the running estimate
    assert_close(ours.running_var, expected, 0, 1e-4, "running_var at mean 1e4")


@pytest.mark.parametrize("ours_cls,shape,message", [
    (batchnorm.BatchNorm1d, (2, 4, 3, 3), "expected 2D or 3D input (got 4D input)"),
    (batchnorm.BatchNorm2d, (2, 4, 3), "expected 4D input (got 3D input)"),
    (batchnorm.BatchNorm3d, (2, 4, 3, 3), "expected 5D input (got 4D input)"),
])  # fmt: skip
def test_wrong_number_of_dimensions(ours_cls, shape, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ours_cls(4)(torch.randn(shape))


def test_wrong_channel_count_and_single_value_leave_the_layer_untouched():
    ours = batchnorm.BatchNorm2d(4)
    ours(torch.randn(4, 4, 2, 2))
    saved = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError, match=r"input has 5 channels, the layer expects 4 \(running_mean should contain"):
        ours(torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(torch.randn(1, 4, 1, 1))
    for key, value in saved.items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_output_takes_inplace_ops_like_torchs(shape, training):
    ours, theirs = _twins(batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm1d,
                          nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)  # fmt: skip
    ours.train(training), theirs.train(training)
    x = torch.randn(shape)
    xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yt = torch.relu_(ours(xo)), torch.relu_(theirs(xt))  # what nn.ReLU(inplace=True) does
    yo.sum().backward()
    yt.sum().backward()
    assert_close(xo.grad, xt.grad, 1e-5, 1e-5, "grad through in-place relu")
    with torch.inference_mode():
        assert_close(torch.relu_(ours(x)), torch.relu_(theirs(x)), 1e-5, 1e-5, "inference mode")


def test_symbolic_trace_of_a_bare_layer_says_to_trace_its_model():
    """torch's layer fails as the root of a symbolic trace too; inside a model, ours is one call."""
    with pytest.raises(torch.fx.proxy.TraceError, match="trace the model that contains it"):
        torch.fx.symbolic_trace(batchnorm.BatchNorm2d(3))
    traced = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), batchnorm.BatchNorm2d(3)))
    assert [n.op for n in traced.graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
