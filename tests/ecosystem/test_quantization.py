"""torch.ao quantization and torch.fx tools on a converted torchvision ResNet-18: they treat our
layers as batch norm, and give what they give on torch's layers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.quantization import (
    fuse_modules,
    fuse_modules_qat,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

import batchnorm
from tests.ecosystem import vision
from tests.helpers import assert_close

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        yield


def _resnet(training: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    theirs = vision.torchvision().models.resnet18(num_classes=10).train(training)
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    return batchnorm.convert(copy.deepcopy(theirs)), theirs


STEM = [["conv1", "bn1", "relu"], ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"],
        ["layer1.0.conv2", "layer1.0.bn2"]]  # fmt: skip


def test_fuse_modules_fuses_our_layers_as_torchs():
    ours, theirs = _resnet(training=False)
    fused_ours, fused_theirs = fuse_modules(ours, STEM), fuse_modules(theirs, STEM)
    assert type(fused_ours.conv1) is type(fused_theirs.conv1) is torch.ao.nn.intrinsic.ConvReLU2d
    assert type(fused_ours.bn1) is nn.Identity and type(fused_ours.layer1[0].bn2) is nn.Identity
    assert_close(fused_ours(X), fused_theirs(X), 1e-5, 1e-5, "fused eval logits")


def test_fuse_modules_takes_a_layer_that_applies_relu_itself():
    conv, bn = nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="relu")
    model = nn.Sequential(conv, bn).eval()
    expected = model(X)
    fused = fuse_modules(copy.deepcopy(model), [["0", "1"]])
    assert type(fused[0]) is torch.ao.nn.intrinsic.ConvReLU2d
    assert_close(fused(X), expected, 1e-5, 1e-5, "conv + BN with fused ReLU")
    silu = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4, activation="silu")).eval()
    with pytest.raises(ValueError, match="fuse a batch norm with ReLU only"):
        fuse_modules(silu, [["0", "1"]])


def test_fuse_modules_qat_gives_torchs_qat_modules():
    ours, theirs = _resnet(training=True)
    fused_ours, fused_theirs = fuse_modules_qat(ours, STEM), fuse_modules_qat(theirs, STEM)
    assert type(fused_ours.conv1) is type(fused_theirs.conv1) is torch.ao.nn.intrinsic.ConvBnReLU2d
    assert_close(fused_ours(X), fused_theirs(X), 1e-5, 1e-5, "fused training logits")


def _ptq(model: nn.Module, backend_config=None) -> nn.Module:
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (X,), backend_config=backend_config)
    prepared(X)  # calibration
    return convert_fx(prepared, backend_config=backend_config)


def test_prepare_fx_runs_on_our_layers_and_with_our_config_quantizes_as_torchs():
    ours, theirs = _resnet(training=False)
    prepared = prepare_fx(copy.deepcopy(ours), get_default_qconfig_mapping(), (X,))
    assert_close(prepared(X), theirs(X), 1e-5, 1e-5, "prepared (observed) model")
    assert _ptq(ours)(X).shape == (2, 10)  # torch's default config: our layers stay float batch norms
    config = batchnorm.quantization.backend_config()
    assert torch.equal(_ptq(ours, config)(X), _ptq(theirs)(X))  # fused into the conv exactly as torch's


def test_prepare_qat_fx_with_our_config_trains_as_torchs():
    ours, theirs = _resnet(training=True)
    config = batchnorm.quantization.backend_config()
    prepared_ours = prepare_qat_fx(copy.deepcopy(ours), get_default_qat_qconfig_mapping(), (X,), backend_config=config)
    prepared_theirs = prepare_qat_fx(copy.deepcopy(theirs), get_default_qat_qconfig_mapping(), (X,))
    assert_close(prepared_ours(X), prepared_theirs(X), 1e-5, 1e-5, "QAT training step output")
    prepared_ours.eval(), prepared_theirs.eval()
    quantized_ours, quantized_theirs = convert_fx(prepared_ours, backend_config=config), convert_fx(prepared_theirs)
    assert torch.equal(quantized_ours(X), quantized_theirs(X))
    assert prepare_qat_fx(copy.deepcopy(ours), get_default_qat_qconfig_mapping(), (X,))(X).shape == (2, 10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_symbolic_trace_and_feature_extractor_keep_our_layers_whole(training):
    ours, theirs = _resnet(training)
    traced = torch.fx.symbolic_trace(ours)
    assert traced.state_dict().keys() == theirs.state_dict().keys()
    assert [n.target for n in traced.graph.nodes if n.op == "call_module" and "bn" in n.target][:2] == [
        "bn1", "layer1.0.bn1"]  # fmt: skip
    reference = copy.deepcopy(theirs)
    assert_close(traced(X), reference(X), 1e-5, 1e-5, "traced logits")
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = {"layer1": "low", "layer4": "high"}
    got = create_feature_extractor(ours, nodes)(X)
    expected = create_feature_extractor(theirs, nodes)(X)
    for name in nodes.values():
        assert_close(got[name], expected[name], 1e-5, 1e-5, name)
