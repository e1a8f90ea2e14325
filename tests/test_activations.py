"""Activation specs, derivatives and inverses against torch's autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchnorm import activations
from batchnorm.activations import Activation
from tests.helpers import assert_close

ALL = [Activation("identity"), Activation("relu"), Activation("leaky_relu", 0.2), Activation("elu", 0.7),
       Activation("silu")]  # fmt: skip


@pytest.mark.parametrize(
    "spec,expected",
    [(None, Activation("identity", 0.0)), ("relu", Activation("relu", 0.0)),
     ("leaky_relu", Activation("leaky_relu", 0.01)), (("elu", 0.5), Activation("elu", 0.5)),
     (nn.LeakyReLU(0.3), Activation("leaky_relu", 0.3)), (nn.ELU(2.0), Activation("elu", 2.0)),
     (nn.SiLU(), Activation("silu", 0.0)), (nn.ReLU(inplace=True), Activation("relu", 0.0))],
)  # fmt: skip
def test_parse(spec, expected):
    assert activations.parse(spec) == expected


def test_parse_rejects_unknown():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        activations.parse("gelu")
    with pytest.raises(ValueError, match="cannot fuse activation Tanh"):
        activations.parse(nn.Tanh())


@pytest.mark.parametrize("act", ALL, ids=str)
def test_derivatives_match_autograd(act):
    z = torch.randn(200, dtype=torch.float64, requires_grad=True)
    y = activations.forward(z, act)
    (expected,) = torch.autograd.grad(y.sum(), z)
    from_input = activations.grad_from_input(z.detach(), act)
    assert_close(torch.ones_like(z) if from_input is None else from_input, expected, 1e-12, 1e-12, "from z")
    if act.invertible:
        from_output = activations.grad_from_output(y.detach(), act)
        assert_close(torch.ones_like(z) if from_output is None else from_output, expected, 1e-12, 1e-9, "from y")
        assert_close(activations.inverse(y.detach(), act), z, 1e-12, 1e-9, "inverse")
    out = z.detach().clone()
    activations.apply_(out, act)
    assert_close(out, y, 0, 0, "in place")


def test_invertibility():
    assert [a.invertible for a in ALL] == [True, False, True, True, False]
    assert not Activation("leaky_relu", 0.0).invertible
