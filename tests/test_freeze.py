"""Freezing for fine-tuning: statistics frozen (training normalizes as eval, no update),
affine frozen (no learning), on our layers, through ``freeze(model, training=True)``, and
torchvision's ``FrozenBatchNorm2d`` converted to ours with the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close, backends_fixture

each_backend = backends_fixture()


def _step(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad for p in (layer.weight, layer.bias)]
    layer.zero_grad(set_to_none=True)
    return y, grads


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5, 6)], ids=str)
def test_frozen_statistics_train_as_torchs_eval_and_never_update(shape, each_backend):
    """In training mode the layer computes what torch's layer computes in eval (output and
    every gradient), and its buffers and counters stay as they were."""
    gen = torch.Generator().manual_seed(0)
    cls, ref_cls = (
        (batchnorm.BatchNorm1d, nn.BatchNorm1d) if len(shape) == 2 else (batchnorm.BatchNorm2d, nn.BatchNorm2d)
    )
    ours = cls(4, freeze_statistics=True, dtype=torch.float64).train()
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1, generator=gen)
        ours.running_var.uniform_(0.5, 2, generator=gen)
        ours.weight.uniform_(0.5, 1.5, generator=gen)
    theirs = ref_cls(4, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    theirs.eval()
    saved = copy.deepcopy(ours.state_dict())
    x = torch.randn(shape, dtype=torch.float64, generator=gen) * 2
    dy = torch.randn(shape, dtype=torch.float64, generator=gen)
    (y, grads), (y_ref, grads_ref) = _step(ours, x, dy), _step(theirs, x, dy)
    assert_close(y, y_ref, 1e-12, 1e-12, "y")
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, grads_ref, strict=True):
        assert_close(got, want, 1e-12, 1e-12, name)
    for key, value in saved.items():
        assert torch.equal(ours.state_dict()[key], value), key
    assert ours.training and "freeze_statistics=True" in repr(ours)


def test_frozen_affine_does_not_learn_and_can_be_unfrozen():
    layer = batchnorm.BatchNorm2d(3, freeze_affine=True)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad and layer.freeze_affine
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None and int(layer.num_batches_tracked) == 1
    layer.freeze_affine = False
    assert layer.weight.requires_grad and not layer.freeze_affine
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        batchnorm.BatchNorm2d(3, track_running_stats=False, freeze_statistics=True)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), batchnorm.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5),
    ).double()  # fmt: skip


@pytest.mark.parametrize(("statistics", "affine"), [(True, True), (True, False), (False, True)])
def test_freeze_for_fine_tuning_freezes_what_it_is_asked(statistics, affine):
    model = _model()
    with torch.no_grad():  # running statistics that are not the initial ones
        model.train()(torch.randn(8, 3, 8, 8, dtype=torch.float64))
    reference = copy.deepcopy(model).eval()
    frozen = batchnorm.freeze(model, training=True, statistics=statistics, affine=affine).train()
    layers = [m for m in frozen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(layers) == 3 and all(isinstance(m, batchnorm.BatchNorm2d | batchnorm.BatchNorm1d) for m in layers)
    buffers = {k: v.clone() for k, v in frozen.state_dict().items()}
    weights = [p.detach().clone() for m in layers for p in (m.weight, m.bias)]
    conv = frozen[0].weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    y = frozen(x)
    if statistics:
        torch.testing.assert_close(y, reference(x), rtol=1e-12, atol=1e-12)  # training mode, eval's output
    y.square().mean().backward()
    optimizer.step()
    assert not torch.equal(frozen[0].weight, conv)  # the rest of the model learns
    after = [p.detach() for m in layers for p in (m.weight, m.bias)]
    assert all(torch.equal(a, b) for a, b in zip(after, weights, strict=True)) == affine
    unchanged = all(torch.equal(frozen.state_dict()[k], v) for k, v in buffers.items() if "running" in k)
    assert unchanged == statistics


def test_freeze_for_inference_refuses_half_a_freeze():
    with pytest.raises(ValueError, match="pass training=True"):
        batchnorm.freeze(_model().eval(), affine=False)


def _torchvision_frozen():
    from batchnorm import _torchvision

    _torchvision.load()
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d


@pytest.mark.parametrize("how", ["convert", "freeze"])
def test_torchvision_frozen_batch_norm_converts_to_ours_with_the_same_outputs(how):
    frozen_cls = _torchvision_frozen()
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), frozen_cls(5, eps=1e-3), nn.ReLU(), nn.Conv2d(5, 2, 1))
    with torch.no_grad():
        bn = model[1]
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
    x = torch.randn(4, 3, 9, 9)
    expected = model(x)
    keys = set(model.state_dict())
    converted = batchnorm.convert(model) if how == "convert" else batchnorm.freeze(model, training=True)
    layer = converted[1]
    assert type(layer) is batchnorm.BatchNorm2d and layer.freeze_statistics and layer.freeze_affine
    assert layer.eps == 1e-3 and layer.weight.data_ptr() == bn.weight.data_ptr()  # the same tensors
    for mode in (True, False):
        torch.testing.assert_close(converted.train(mode)(x), expected, rtol=1e-6, atol=1e-6)
    assert set(converted.state_dict()) == keys | {"1.num_batches_tracked"}
    optimizer = torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.1)
    converted(x).sum().backward()
    optimizer.step()
    assert torch.equal(layer.running_var, bn.running_var) and int(layer.num_batches_tracked) == 0


def test_frozen_statistics_under_torchscript_and_a_trace_are_torchs_eval():
    """The tools' paths (TorchScript compiles its own branch; a trace records torch's ops)
    give what torch's eval-mode layer gives, in training mode."""
    gen = torch.Generator().manual_seed(3)
    ours = batchnorm.BatchNorm2d(4, freeze_statistics=True).train()
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1, generator=gen)
        ours.running_var.uniform_(0.5, 2, generator=gen)
    theirs = nn.BatchNorm2d(4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 5, 5, generator=gen)
    expected = theirs.eval()(x)
    torch.testing.assert_close(torch.jit.script(ours)(x), expected)
    torch.testing.assert_close(torch.jit.trace(ours, x)(x), expected)
    assert int(ours.num_batches_tracked) == 0
