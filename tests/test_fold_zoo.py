"""``batchnorm.fold`` on a zoo of small nets: folded outputs equal the eval model's, and what is not folded is said.

Each net gets random weights and non-default running statistics (a few training batches,
then random gamma and beta); the folded model must match the eval model to float32 rounding,
keep no batch-norm layer where a fold was possible, and its report must say why for the rest.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import _torchvision
from batchnorm.fold import FoldReport, FrozenBatchNorm, fold, freeze
from tests.helpers import assert_close

_TV_FROZEN = _torchvision.load().ops.misc.FrozenBatchNorm2d


def _trained(model: nn.Module, *shapes, steps: int = 3) -> nn.Module:
    """``model`` after a few training batches, with random gamma/beta (and random frozen statistics), in eval."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*[torch.randn(s) * 2 + 1 for s in shapes])
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
            if isinstance(m, _TV_FROZEN):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    return model.eval()


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm, _TV_FROZEN))]


def _check(model, *inputs, tol=1e-5, **kwargs) -> tuple[nn.Module, FoldReport]:
    """Fold ``model``; assert the outputs match (relative to the output scale) and the report is complete."""
    expected = model(*inputs)
    folded, report = fold(model, report=True, **kwargs)
    actual = folded(*inputs)
    scale = expected.abs().max().item()
    assert_close(actual, expected, tol * scale, tol, "folded")
    assert all(e.reason for e in report.frozen + report.left), str(report)
    assert len(_batch_norms(folded)) == len({e.batch_norm for e in report.frozen + report.left}), str(report)
    return folded, report


class _ResNetBlock(nn.Module):
    def __init__(self, c: int, bn=nn.BatchNorm2d):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.down, self.bn_down = nn.Conv2d(c, c, 1, stride=1, bias=False), bn(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.bn_down(self.down(x)))


def _resnet(bn=nn.BatchNorm2d):
    stem = [nn.Conv2d(3, 8, 3, stride=2, padding=1), bn(8), nn.ReLU()]
    return nn.Sequential(*stem, _ResNetBlock(8, bn), _ResNetBlock(8, bn), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5))  # fmt: skip


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bn", [nn.BatchNorm2d, batchnorm.BatchNorm2d], ids=["torch", "ours"])
def test_resnet_folds_every_batch_norm(bn, memory_format):
    model = _trained(_resnet(bn), (4, 3, 12, 12)).to(memory_format=memory_format)
    x = torch.randn(2, 3, 12, 12).to(memory_format=memory_format)
    folded, report = _check(model, x)
    assert _batch_norms(folded) == [] and len(report.folded) == 7 and not report.frozen
    assert report.of("3.bn1").target == "3.conv1"


def test_resnet_of_frozen_layers_folds_ours_and_torchvisions():
    tv = _trained(_resnet(_TV_FROZEN), (4, 3, 12, 12))
    ours = freeze(_trained(_resnet(), (4, 3, 12, 12)))
    for model in (tv, ours):
        folded, report = _check(model, torch.randn(2, 3, 12, 12))
        assert _batch_norms(folded) == [] and len(report.folded) == 7


def test_torchvision_resnet18_with_frozen_batch_norm_folds():
    model = _trained(_torchvision.load().models.resnet18(num_classes=4, norm_layer=_TV_FROZEN), (1, 3, 32, 32))
    folded, report = _check(model, torch.randn(2, 3, 32, 32), tol=1e-4)
    assert _batch_norms(folded) == [] and len(report.folded) == 20


class _MobileNetBlock(nn.Module):
    """Pointwise expansion, depthwise 3x3 (stride 2), pointwise projection; our BN with ReLU fused."""

    def __init__(self, c_in: int, c_out: int, expand: int = 2):
        super().__init__()
        hidden = c_in * expand
        self.pre = nn.BatchNorm2d(c_in)  # before the grouped 1x1 conv (no padding): folds before it
        self.expand = nn.Conv2d(c_in, hidden, 1, groups=2, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(hidden, activation="relu")
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=2, padding=1, groups=hidden, bias=False)
        self.bn2 = batchnorm.BatchNorm2d(hidden, activation="relu")
        self.project = nn.Conv2d(hidden, c_out, 1, bias=False)
        self.bn3 = batchnorm.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn3(self.project(self.bn2(self.depthwise(self.bn1(self.expand(self.pre(x)))))))


def test_depthwise_separable_net_folds_and_keeps_the_fused_relu_after_the_conv():
    model = _trained(nn.Sequential(_MobileNetBlock(4, 6), _MobileNetBlock(6, 8)), (4, 4, 10, 10))
    folded, report = _check(model, torch.randn(2, 4, 10, 10))
    assert _batch_norms(folded) == [] and len(report.folded) == 8
    assert report.of("0.pre").target == "0.expand" and "before" in report.of("0.pre").reason
    assert "relu kept after it" in report.of("0.bn2").reason
    code = folded.code  # the relu runs on the folded depthwise conv's output
    assert code.index("depthwise") < code.index("bn2") < code.index("project")


class _UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn_down = batchnorm.BatchNorm2d(8, activation="relu")
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.bn_up = nn.BatchNorm2d(6)
        self.up_grouped = nn.ConvTranspose2d(6, 4, 3, stride=1, padding=2, groups=2, dilation=2)
        self.bn_up_grouped = nn.BatchNorm2d(4)
        self.bn_before_up = nn.BatchNorm2d(7)  # before a strided ConvTranspose: cannot fold, frozen
        self.up2 = nn.ConvTranspose2d(7, 4, 2, stride=2)
        self.bn_before_1x1 = nn.BatchNorm2d(4)  # before a 1x1 ConvTranspose: folds before it
        self.head = nn.ConvTranspose2d(4, 2, 1, groups=2)

    def forward(self, x):
        y = self.bn_up_grouped(self.up_grouped(self.bn_up(self.up(self.bn_down(self.down(x))))))
        y = torch.cat([y, x], dim=1)
        return self.head(self.bn_before_1x1(torch.relu(self.up2(self.bn_before_up(y)))))


def test_unet_folds_into_transposed_and_grouped_transposed_convs():
    model = _trained(_UNet(), (4, 3, 8, 8))
    folded, report = _check(model, torch.randn(2, 3, 8, 8))
    assert [e.batch_norm for e in report.folded] == ["bn_down", "bn_up", "bn_up_grouped", "bn_before_1x1"]
    assert report.of("bn_up_grouped").target == "up_grouped"
    assert report.of("bn_before_1x1").target == "head"  # after a relu: folds into the 1x1 transposed conv after it
    frozen = report.of("bn_before_up")
    assert frozen.action == "frozen" and "transposed convolution" in frozen.reason and "cat" in frozen.reason
    assert len(_batch_norms(folded)) == 1


def test_mlp_folds_bn1d_before_and_after_linear():
    model = nn.Sequential(
        nn.BatchNorm1d(6), nn.Linear(6, 16), batchnorm.BatchNorm1d(16, activation="relu"),
        nn.BatchNorm1d(16), nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.Linear(16, 3),
    )  # fmt: skip
    model = _trained(model, (32, 6))
    x = torch.randn(5, 6)
    for kwargs in ({}, {"example_inputs": (x,)}):
        folded, report = _check(model, x, **kwargs)
        assert _batch_norms(folded) == []
        assert [(e.batch_norm, e.target) for e in report.folded] == [("0", "1"), ("2", "1"), ("3", "4"), ("5", "4")]


def test_bn1d_on_sequences_is_not_folded_into_a_linear_over_the_last_dim_when_shapes_are_known():
    model = _trained(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4)), (8, 5, 5))  # (N, C, L), C == L
    x = torch.randn(3, 5, 5)
    folded, report = _check(model, x, example_inputs=(x,))
    assert report.of("0").action == "frozen" and "Linear sees a 3-d input" in report.of("0").reason
    assert _batch_norms(folded) == [folded.get_submodule("0")]


class _ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 1)
        self.tied = nn.Conv2d(4, 4, 1)
        self.tied.weight = self.other.weight  # two modules, one nn.Parameter
        self.bn_tied = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn_a(self.conv(x)) + self.bn_b(self.conv(x * 2))
        z = self.bn_tied(self.tied(y)) + self.other(y)
        return z + nn.functional.conv2d(x, self.conv.weight, padding=1)  # the conv's weight, read directly


def test_a_conv_called_twice_and_a_shared_parameter_are_folded_into_copies():
    model = _trained(_ConvUsedTwice(), (4, 4, 6, 6))
    original_weight = model.other.weight.detach().clone()
    folded, report = _check(model, torch.randn(2, 4, 6, 6))
    assert _batch_norms(folded) == [] and len(report.folded) == 3
    a, b = report.of("bn_a"), report.of("bn_b")
    assert {a.target, b.target} == {"conv_folded", "conv_folded2"}, str(report)
    assert "other uses" in a.reason and "other uses" in b.reason
    assert torch.equal(folded.conv.weight, model.conv.weight)  # the direct read sees the original
    assert "shared with other" in report.of("bn_tied").reason
    assert torch.equal(folded.other.weight, original_weight)


def test_a_batch_norm_whose_output_is_used_twice_is_frozen_and_says_why():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.conv(y) + y

    folded, report = _check(_trained(Branch(), (4, 3, 5, 5)), torch.randn(2, 3, 5, 5))
    assert isinstance(folded.bn, FrozenBatchNorm) and "used by 2 nodes" in report.of("bn").reason


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular", "replicate"])
def test_bn_before_a_padded_conv_folds_only_where_the_padding_copies_its_input(dims, padding_mode):
    conv = getattr(nn, f"Conv{dims}d")(4, 6, 3, padding=1, padding_mode=padding_mode, groups=2, dilation=1)
    model = _trained(nn.Sequential(getattr(nn, f"BatchNorm{dims}d")(4), conv), (4, 4, *[6] * dims))
    folded, report = _check(model, torch.randn(2, 4, *[6] * dims))
    if padding_mode == "zeros":
        assert report.of("0").action == "frozen" and "pads with zeros" in report.of("0").reason
    else:
        assert report.of("0").target == "1" and _batch_norms(folded) == []


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bn_before_an_unpadded_strided_dilated_grouped_conv_folds(dims):
    conv = getattr(nn, f"Conv{dims}d")(4, 8, 3, stride=2, dilation=2, groups=4)
    model = _trained(nn.Sequential(getattr(nn, f"BatchNorm{dims}d")(4), conv), (4, 4, *[9] * dims))
    folded, report = _check(model, torch.randn(2, 4, *[9] * dims))
    assert report.of("0").target == "1" and _batch_norms(folded) == []


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bn_after_a_grouped_dilated_transposed_conv_folds(dims):
    up = getattr(nn, f"ConvTranspose{dims}d")(4, 6, 3, stride=2, groups=2, dilation=2, output_padding=1)
    model = _trained(nn.Sequential(up, getattr(nn, f"BatchNorm{dims}d")(6)), (4, 4, *[4] * dims))
    folded, report = _check(model, torch.randn(2, 4, *[4] * dims))
    assert report.of("1").target == "0" and _batch_norms(folded) == []


def test_a_zero_shift_folds_before_a_zero_padded_conv():
    model = _trained(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), (4, 3, 6, 6))
    with torch.no_grad():  # shift = beta - mean * scale = 0
        model[0].bias.zero_(), model[0].running_mean.zero_()
    _, report = _check(model, torch.randn(2, 3, 6, 6))
    assert report.of("0").target == "1"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_fold_in_float32_then_cast(dtype):
    model32 = _trained(_resnet(), (4, 3, 12, 12))
    with torch.no_grad():  # weights and statistics that the half model holds exactly
        for t in [*model32.parameters(), *model32.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    model = _resnet().to(dtype)
    model.load_state_dict(model32.state_dict())
    model.eval()
    folded, report = fold(model, report=True)
    folded32 = fold(model32)
    assert _batch_norms(folded) == [] and len(report.folded) == 7
    assert folded.get_parameter("0.weight").dtype == dtype
    for name, p in folded32.named_parameters():
        assert torch.equal(folded.get_parameter(name), p.to(dtype)), name
    x = torch.randn(2, 3, 12, 12)
    expected = model32(x)
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    assert_close(folded(x.to(dtype)).float(), expected, tol * expected.abs().max().item(), 0, "half folded")


def test_a_batch_norm_with_a_forward_of_its_own_is_left_and_training_mode_is_refused():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = _trained(nn.Sequential(nn.Conv2d(3, 3, 1), Scaled(3)), (4, 3, 5, 5))
    _, report = _check(model, torch.randn(2, 3, 5, 5))
    assert report.of("1").action == "left" and "forward of its own" in report.of("1").reason
    assert "left 1" in str(report) and "forward of its own" in str(report)
    with pytest.raises(ValueError, match="training mode"):
        fold(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


def test_report_table_says_what_was_folded_and_why_the_rest_was_not():
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                                   nn.Conv2d(4, 4, 3, padding=1)), (4, 3, 8, 8))  # fmt: skip
    _, report = _check(model, torch.randn(2, 3, 8, 8))
    text = str(report)
    assert text.splitlines()[0] == "folded 1 batch norm(s), froze 1, left 0"
    assert text.splitlines()[1].split() == ["1", "folded", "into", "0"]
    assert text.splitlines()[2].split()[:9] == ["3", "frozen:", "not", "after", "a", "layer:", "its", "input", "comes"]
    assert "from 2 (ReLU), not a conv/linear layer" in text and "4: it pads with zeros" in text
    assert fold(model).__class__.__name__ == "Sequential" and not isinstance(fold(model), tuple)
