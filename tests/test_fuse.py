"""``batchnorm.fuse`` on a ResNet-style client and on patterns it must leave alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.activations import Activation
from batchnorm.experiments.resnet import TinyResNet
from batchnorm.memory import saved_bytes
from tests.helpers import assert_close


def _fused_layers(model):
    return {name: m.activation for name, m in model.named_modules() if isinstance(m, batchnorm.BatchNorm2d)}


def _train_side_by_side(original, fused, steps=3):
    """SGD steps on both models from the same batches: equal losses, then equal parameters."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (original, fused)]
    for step in range(steps):
        x, target = torch.randn(4, 3, 10, 10), torch.randint(0, 5, (4,))
        losses = []
        for model, optimizer in zip((original, fused), optimizers, strict=True):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], 1e-5, 1e-5, f"step {step} loss")
    for (name, p_ref), p_fused in zip(original.named_parameters(), fused.parameters(), strict=True):
        assert_close(p_fused, p_ref, 1e-5, 1e-4, name)


def test_resnet_blocks_fuse_and_train_like_the_original():
    original = TinyResNet()
    fused = batchnorm.fuse(copy.deepcopy(original))
    acts = _fused_layers(fused)
    relu = Activation("relu")
    # stem BN+ReLU, bn1 of every block, bn2 of the bottleneck, and every block's last BN + add + ReLU
    assert acts["stem.1"] == relu
    assert all(acts[f"layers.{i}.bn1"] == relu for i in range(4))
    assert all(acts[f"layers.{i}.bn2"] == relu for i in range(3)) and acts["layers.3.bn3"] == relu
    # the downsample BN is the add's other operand, not followed by an activation: left as it was
    assert type(fused.get_submodule("layers.1.downsample.1")) is nn.BatchNorm2d
    _train_side_by_side(original, fused)
    original.eval(), fused.eval()
    x = torch.randn(2, 3, 10, 10)
    assert_close(fused(x), original(x), 1e-5, 1e-5, "eval")


def test_memory_efficient_fuse_frees_the_inputs_of_invertible_blocks_and_trains_alike():
    def leaky():
        return nn.LeakyReLU(0.1, inplace=True)

    original = TinyResNet(activation=leaky)
    plain = batchnorm.fuse(copy.deepcopy(original))
    saving = batchnorm.fuse(copy.deepcopy(original), memory_efficient=True)
    efficient = {n for n, m in saving.named_modules() if getattr(m, "memory_efficient", False)}
    # BN + LeakyReLU without a residual: the stem and every block's inner BNs; never one before an add
    assert efficient == {"stem.1", *(f"layers.{i}.bn1" for i in range(4)), "layers.3.bn2"}
    x, target = torch.randn(4, 3, 10, 10), torch.randint(0, 5, (4,))
    kept = {name: saved_bytes(lambda m=m: nn.functional.cross_entropy(m(x), target)) for name, m in
            (("original", original), ("plain", plain), ("saving", saving))}  # fmt: skip
    assert kept["saving"] < 0.85 * kept["plain"] <= 0.85 * kept["original"], kept
    _train_side_by_side(original, saving)


def test_fuse_returns_a_new_model_with_the_same_state_and_leaves_the_original_untouched():
    original = TinyResNet(activation=lambda: nn.LeakyReLU(0.2)).eval()
    x = torch.randn(3, 3, 10, 10)
    before, state = original(x), copy.deepcopy(original.state_dict())
    fused = batchnorm.fuse(original)
    assert fused is not original and not any(isinstance(m, batchnorm.BatchNorm2d) for m in original.modules())
    assert_close(original(x), before, 0, 0, "the original after fuse")  # not rewritten: no LeakyReLU twice
    assert_close(fused(x), before, 1e-5, 1e-5, "the fused model")
    assert fused.state_dict().keys() == state.keys()
    for key, value in fused.state_dict(keep_vars=True).items():
        assert torch.equal(value, state[key]) and value is not original.state_dict(keep_vars=True)[key], key


class _UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(x)
        return torch.relu(y) + y  # the BN output is needed unactivated too


class _SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return torch.relu(self.bn(x)) + self.bn(x * 2)  # one module, two call sites


class _InPlaceAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.bn(x)
        y.mul_(2)  # an in-place op on the BN output before the activation
        return torch.relu(y)


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x, r):
        return nn.functional.leaky_relu(r + self.bn(x), 0.2)


@pytest.mark.parametrize("cls", [_UsedTwice, _SharedBN, _InPlaceAlias])
def test_unsafe_patterns_are_left_alone(cls):
    model = cls()
    fused = batchnorm.fuse(copy.deepcopy(model))
    assert getattr(fused.bn, "activation", Activation()) == Activation()
    x = torch.randn(6, 4)
    assert_close(fused(x), model(x), 1e-6, 1e-6, "output")


def test_functional_activation_with_residual_on_the_left_fuses():
    model = _Functional()
    fused = batchnorm.fuse(copy.deepcopy(model))
    assert fused.bn.activation == Activation("leaky_relu", 0.2)
    x, r = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    assert_close(fused(x2, r2), model(x, r), 1e-6, 1e-6, "output")
    model(x, r).sum().backward()
    fused(x2, r2).sum().backward()
    assert_close(x2.grad, x.grad, 1e-5, 1e-5, "x grad")
    assert_close(r2.grad, r.grad, 1e-6, 1e-6, "residual grad")


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ELU(0.5), nn.Linear(4, 2))

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.body(x)


def test_untraceable_model_falls_back_to_the_sequential_walk():
    model = _Untraceable()
    with pytest.warns(UserWarning, match=r"fuse: torch.fx cannot trace _Untraceable.forward \(TraceError"):
        fused = batchnorm.fuse(copy.deepcopy(model))
    assert type(fused) is _Untraceable
    assert fused.body[1].activation == Activation("elu", 0.5) and isinstance(fused.body[2], nn.Identity)
    x = torch.randn(5, 3)
    assert_close(fused(x), model(x), 1e-6, 1e-6, "output")


def test_fuse_traces_through_our_own_layers_and_is_idempotent():
    original = TinyResNet()
    ours = batchnorm.convert(copy.deepcopy(original))
    fused = batchnorm.fuse(ours)
    assert _fused_layers(fused)["layers.0.bn2"] == Activation("relu")
    again = batchnorm.fuse(fused)
    assert _fused_layers(again) == _fused_layers(fused)
    x = torch.randn(3, 3, 10, 10)
    assert_close(again(x), original(x), 1e-5, 1e-5, "output")


def test_memory_saving_mode_applies_to_layers_fused_before():
    original = TinyResNet(activation=lambda: nn.LeakyReLU(0.1))
    once = batchnorm.fuse(original)
    twice = batchnorm.fuse(once, memory_efficient=True)
    direct = batchnorm.fuse(original, memory_efficient=True)

    def saving(model):
        return {n for n, m in model.named_modules() if getattr(m, "memory_efficient", False)}

    assert saving(once) == set() and saving(twice) == saving(direct) != set()
