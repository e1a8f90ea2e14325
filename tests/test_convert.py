"""``batchnorm.convert``: swapping a model's batch-norm layers both ways, keeping state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False)),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 6), nn.BatchNorm1d(6, momentum=None),
    )  # fmt: skip


def test_convert_swaps_every_layer_and_keeps_tensors_and_mode():
    model = _model()
    model(torch.randn(5, 3, 8, 8))  # move the running statistics away from their defaults
    model[3].eval()
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    batchnorm.convert(model)
    assert type(model[1]) is batchnorm.BatchNorm2d and type(model[3][1]) is batchnorm.BatchNorm2d
    assert type(model[6]) is batchnorm.BatchNorm1d and model[6].momentum is None
    assert not model[3][1].training and model[1].training and model[3][1].weight is None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in tensors:
            assert t is tensors[name], f"{name} was copied, not kept"
    assert int(model[1].num_nonfinite_batches) == 0


def test_converted_model_computes_what_torch_does_and_back():
    torch_model = _model()
    ours = batchnorm.convert(copy.deepcopy(torch_model))
    x = torch.randn(5, 3, 8, 8)
    assert_close(ours(x), torch_model(x), 1e-5, 1e-5, "train output")
    for key, value in torch_model.state_dict().items():
        assert_close(ours.state_dict()[key], value, 1e-6, 1e-6, key)
    back = batchnorm.convert(ours, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and type(back[6]) is nn.BatchNorm1d
    back.eval(), torch_model.eval()
    assert_close(back(x), torch_model(x), 1e-5, 1e-5, "eval output")


def test_optimizer_built_before_convert_still_trains_the_model():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batchnorm.convert(model)
    before = model[1].weight.detach().clone()
    model(torch.randn(5, 3, 8, 8)).square().mean().backward()
    optimizer.step()
    assert not torch.equal(model[1].weight.detach(), before)


def test_convert_of_a_bare_layer_returns_the_replacement_and_keeps_hooks():
    layer = nn.BatchNorm1d(3, track_running_stats=False)
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    ours = batchnorm.convert(layer)
    assert type(ours) is batchnorm.BatchNorm1d and ours.running_mean is None
    ours(torch.randn(4, 3))
    assert seen == [torch.Size([4, 3])]


def test_flipped_track_running_stats_survives_convert():
    layer = nn.BatchNorm1d(3)
    layer.track_running_stats = False
    ours = batchnorm.convert(layer)
    assert ours.running_mean is not None and ours.track_running_stats is False


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="expects one of \\['batchnorm', 'torch'\\], got 'jax'"):
        batchnorm.convert(_model(), to="jax")
