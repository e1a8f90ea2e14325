"""``batchnorm.fold``: freezing and folding eval-mode batch norms keeps the predictions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import reference
from batchnorm.experiments.resnet import TinyResNet
from batchnorm.fold import FrozenBatchNorm, fold, freeze
from tests.helpers import assert_close


def _trained(model, shape, steps=3):
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape) * 2 + 1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model.eval()


def test_frozen_layer_is_the_reference_inference_affine():
    layer = _trained(batchnorm.BatchNorm1d(4), (8, 4))
    frozen = FrozenBatchNorm.from_batch_norm(layer)
    a, b = reference.inference_affine(
        layer.running_mean.numpy(), layer.running_var.numpy(),
        layer.weight.detach().numpy(), layer.bias.detach().numpy(), layer.eps,
    )  # fmt: skip
    x = torch.randn(5, 4, 3)
    assert_close(frozen(x), reference.inference(x.numpy(), a, b), 1e-5, 1e-5, "frozen")
    assert_close(frozen(x), layer(x), 1e-6, 1e-6, "eval layer")


def test_freeze_replaces_every_batch_norm_and_keeps_predictions():
    model = _trained(TinyResNet(), (4, 3, 10, 10))
    x = torch.randn(3, 3, 10, 10)
    expected = model(x)
    frozen = freeze(copy.deepcopy(model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert sum(isinstance(m, FrozenBatchNorm) for m in frozen.modules()) == 11
    assert_close(frozen(x), expected, 1e-5, 1e-5, "frozen model")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fold_merges_conv_and_bn_and_keeps_predictions(memory_format):
    model = _trained(TinyResNet(), (4, 3, 10, 10)).to(memory_format=memory_format)
    x = torch.randn(3, 3, 10, 10).to(memory_format=memory_format)
    expected = model(x)
    folded = fold(model)
    remaining = [m for m in folded.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm))]
    assert remaining == []  # every BN in this ResNet follows a conv
    assert_close(folded(x), expected, 1e-4, 1e-4, "folded model")
    assert_close(model(x), expected, 0, 0, "original untouched")


def test_fold_keeps_a_fused_activation_and_folds_a_bn_after_a_bn_into_the_next_linear():
    model = nn.Sequential(
        nn.Linear(6, 5), batchnorm.BatchNorm1d(5, activation=("leaky_relu", 0.1)),
        batchnorm.BatchNorm1d(5), nn.Linear(5, 2),
    )  # fmt: skip
    model = _trained(model, (16, 6))
    x = torch.randn(7, 6)
    expected = model(x)
    folded, report = fold(model, report=True)
    assert not any(isinstance(m, (FrozenBatchNorm, nn.modules.batchnorm._BatchNorm)) for m in folded.modules())
    assert [(e.batch_norm, e.target) for e in report.folded] == [("1", "0"), ("2", "3")]  # the BN after a BN: before
    assert "leaky_relu kept after it" in report.of("1").reason
    assert_close(folded(x), expected, 1e-5, 1e-5, "folded")


def test_fold_into_a_conv_used_twice_is_refused_and_frozen_instead():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _trained(Twice(), (4, 3, 5, 5))
    x = torch.randn(2, 3, 5, 5)
    folded = fold(model)
    assert isinstance(folded.bn, FrozenBatchNorm)
    assert_close(folded(x), model(x), 1e-5, 1e-5, "output")


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match=r"in training mode.*call model.eval\(\) first"):
        freeze(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match="keeps no running statistics"):
        freeze(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False).eval()))


def test_fold_of_a_fused_model_keeps_predictions():
    model = _trained(batchnorm.fuse(TinyResNet()), (4, 3, 10, 10))
    x = torch.randn(3, 3, 10, 10)
    expected = model(x)
    folded, report = fold(model, report=True)
    # BNs that take a residual fold too: the add and activation stay after the conv
    assert sum(isinstance(m, FrozenBatchNorm) for m in folded.modules()) == 0
    assert len(report.folded) == 11 and sum("residual add and relu kept" in e.reason for e in report.folded) == 4
    assert_close(folded(x), expected, 1e-4, 1e-4, "folded fused model")


def test_fold_leaves_the_model_untouched_and_folds_frozen_layers():
    model = _trained(TinyResNet(), (4, 3, 10, 10))
    x = torch.randn(3, 3, 10, 10)
    expected, state = model(x), copy.deepcopy(model.state_dict())
    folded = fold(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FrozenBatchNorm) for m in model.modules())  # nothing swapped in the original
    frozen = freeze(copy.deepcopy(model))
    refolded = fold(frozen)  # a frozen model folds as its batch norms would
    for result in (folded, refolded):
        assert_close(result(x), expected, 1e-5, 1e-5, "folded")
        assert sum(isinstance(m, FrozenBatchNorm) for m in result.modules()) == sum(
            isinstance(m, FrozenBatchNorm) for m in folded.modules())  # fmt: skip
    assert sum(isinstance(m, FrozenBatchNorm) for m in refolded.modules()) < 11


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.bn(self.conv(x))


def test_an_untraceable_model_is_frozen_and_says_why():
    model = _DataDependent().eval()
    with pytest.warns(UserWarning, match=r"fold: torch.fx cannot trace _DataDependent.forward \(TraceError.*freezing"):
        folded = fold(model)
    assert isinstance(folded.bn, FrozenBatchNorm)
    x = torch.randn(2, 3, 6, 6)
    assert_close(folded(x), model(x), 1e-5, 1e-5, "output")


def test_a_bug_in_forward_is_not_taken_for_untraceable_python():
    class Broken(_DataDependent):
        def forward(self, x):
            raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        fold(Broken().eval())


def test_freeze_and_fold_leave_a_batch_norm_with_its_own_forward_as_it_is():
    """timm's BatchNormAct2d applies an activation in its own forward: freezing it to the eval
    map alone would drop the activation silently. freeze leaves it (and says so), and so does fold."""
    timm = pytest.importorskip("timm")
    norm_act = timm.layers.BatchNormAct2d(4, act_layer=nn.ReLU)
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), norm_act, nn.Conv2d(4, 2, 1)), (4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    bn = model[1]
    without_act = nn.functional.batch_norm(model[0](x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
    assert (model[2](without_act) - expected).abs().max() > 1e-3  # the activation matters here
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) with a forward of their own.*BatchNormAct2d"):
        frozen = freeze(copy.deepcopy(model))
    assert isinstance(frozen[1], timm.layers.BatchNormAct2d)
    assert_close(frozen(x), expected, 1e-6, 1e-6, "frozen")
    folded, done = fold(model, report=True)
    assert_close(folded(x), expected, 1e-5, 1e-5, "folded")
    assert any(isinstance(m, timm.layers.BatchNormAct2d) for m in folded.modules())
    assert done.of("1").action == "left" and "forward of its own" in done.of("1").reason


def test_a_fold_into_a_linear_checks_the_rank_it_assumed():
    """Without example inputs, fold takes a Linear next to a BatchNorm1d to see (N, C). On (N, C, L)
    input with L == C the same model runs, but the Linear works on L: the folded model must raise
    rather than answer wrongly; with example inputs the batch norm is frozen, and exact."""
    model = _trained(nn.Sequential(batchnorm.BatchNorm1d(6), nn.Linear(6, 3)), (8, 6))
    flat, sequence = torch.randn(4, 6), torch.randn(4, 6, 6)
    folded = fold(model)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)) for m in folded.modules())
    assert_close(folded(flat), model(flat), 1e-5, 1e-5, "(N, C)")
    with pytest.raises(AssertionError, match=r"taking its input as \(N, C\); it got another rank"):
        folded(sequence)
    checked, done = fold(model, report=True, example_inputs=(sequence,))
    assert done.frozen and not done.folded
    assert_close(checked(sequence), model(sequence), 1e-5, 1e-5, "(N, C, L) with example inputs")
    scripted = torch.jit.script(folded)
    assert_close(scripted(flat), model(flat), 1e-5, 1e-5, "scripted")
