"""The activations a batch-norm layer can fuse: ``act(BN(x) + residual)``.

Each is described by a name and one parameter (LeakyReLU's slope, ELU's
alpha). Besides the forward, the fused backward needs the derivative from the
pre-activation ``z`` and, for the memory-saving mode, from the output ``y``
alone together with the inverse ``z = act^-1(y)`` (only for the invertible ones).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

Tensor = torch.Tensor

_DEFAULT_PARAM = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.01, "elu": 1.0, "silu": 0.0}
_MODULES = {nn.Identity: "identity", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.SiLU: "silu"}


class Activation(NamedTuple):
    name: str = "identity"
    param: float = 0.0

    @property
    def invertible(self) -> bool:
        """Whether ``y`` determines ``z`` (what the memory-saving mode needs)."""
        return self.name == "identity" or (self.name in ("leaky_relu", "elu") and self.param > 0)

    def __str__(self) -> str:
        return self.name if self.name in ("identity", "relu", "silu") else f"{self.name}({self.param:g})"


IDENTITY = Activation()
NAMES = tuple(_DEFAULT_PARAM)


def parse(spec: str | tuple[str, float] | nn.Module | Activation | None) -> Activation:
    """``None``/``"relu"``/``("leaky_relu", 0.2)``/``nn.LeakyReLU(0.2)`` -> :class:`Activation`."""
    if spec is None:
        return IDENTITY
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, nn.Module):
        name = _MODULES.get(type(spec))
        if name is None:
            raise ValueError(f"cannot fuse activation {type(spec).__name__}; expected one of {NAMES}")
        param = {"leaky_relu": "negative_slope", "elu": "alpha"}.get(name)
        return Activation(name, float(getattr(spec, param)) if param else 0.0)
    if isinstance(spec, tuple):
        name, param = spec
    else:
        name, param = spec, None
    if name not in _DEFAULT_PARAM:
        raise ValueError(f"unknown activation {name!r}; expected one of {NAMES}")
    return Activation(name, float(_DEFAULT_PARAM[name] if param is None else param))


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def activate(z: Tensor, name: str, param: float, inplace: bool = False) -> Tensor:
    """``act(z)`` for the activation called ``name`` (TorchScript compiles this); ``inplace``
    overwrites ``z``, a tensor the caller owns."""
    if name == "relu":
        return torch.relu_(z) if inplace else torch.relu(z)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, param, inplace=inplace)
    if name == "elu":
        return torch.nn.functional.elu(z, param, inplace=inplace)
    if name == "silu":
        return torch.nn.functional.silu(z, inplace=inplace)
    return z


def forward(z: Tensor, act: Activation) -> Tensor:
    return activate(z, act.name, act.param)


def apply_(y: Tensor, act: Activation) -> Tensor:
    """The activation in place on a tensor the caller owns."""
    return activate(y, act.name, act.param, inplace=True)


def grad_from_input(z: Tensor, act: Activation) -> Tensor | None:
    """``act'(z)``; ``None`` for the identity (a factor of one)."""
    if act.name == "relu":
        return (z > 0).to(z.dtype)
    if act.name == "leaky_relu":
        return torch.where(z > 0, 1.0, _scalar(act.param, z))
    if act.name == "elu":
        return torch.where(z > 0, 1.0, act.param * torch.exp(z))
    if act.name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return None


def grad_from_output(y: Tensor, act: Activation) -> Tensor | None:
    """``act'(z)`` from ``y = act(z)`` alone; for ReLU/LeakyReLU ``y > 0`` iff ``z > 0``,
    and ELU's negative side has ``act'(z) = alpha * exp(z) = y + alpha``."""
    if act.name == "relu":
        return (y > 0).to(y.dtype)
    if act.name == "leaky_relu":
        return torch.where(y > 0, 1.0, _scalar(act.param, y))
    if act.name == "elu":
        return torch.where(y > 0, 1.0, y + act.param)
    if act.name == "identity":
        return None
    raise ValueError(f"{act} cannot be differentiated from its output alone")


def inverse(y: Tensor, act: Activation) -> Tensor:
    """``z`` with ``act(z) == y``, for the invertible activations."""
    if act.name == "leaky_relu":
        return torch.where(y > 0, y, y / act.param)
    if act.name == "elu":
        return torch.where(y > 0, y, torch.log1p(y / act.param))
    if act.name == "identity":
        return y
    raise ValueError(f"{act} is not invertible")
