"""The activations a batch-norm layer can fuse, ``y = act(BN(x) + residual)``, and
the one table (``KINDS``) that answers every per-activation question.

An activation is a name and one parameter (:class:`Activation`: LeakyReLU's
slope, ELU's alpha). Per name, ``KINDS`` says:

* ``in_kernel``: whether it has a scalar form (``act(z)`` and ``act'(z)``, ELU's
  and SiLU's through a vectorizable ``exp``) that the backends' loops apply in
  the same pass that writes ``y`` (every activation here); one without runs as
  torch's activation after the kernel, composed by ``kernels.base``;
* ``after_residual``: how the backward gets ``act'(z)`` when a residual was added
  before the activation, so ``z`` can no longer be recomputed from ``x``:
  ``"one"`` (the identity), ``"mask"`` (the 1-bit sign of ``z`` kept by the
  forward, ``kernels.sign_mask``: ``act'`` is 1 or ``negative_slope``),
  ``"output"`` (from ``y`` alone) or ``"residual"`` (the residual is kept and
  ``z`` recomputed). Without a residual the derivative is always recomputed
  from ``x``;
* ``grad``, ``grad_from_output``, ``inverse``: ``act'(z)``, ``act'(z)`` from
  ``y = act(z)``, and ``z`` from ``y`` (the last two where they exist; the
  memory-saving mode needs both, so ``invertible``);
* the ``torch.nn`` module the name stands for, and its parameter's attribute.

Adding an activation is one entry here plus its branch in :func:`activate`
(the forward, which TorchScript compiles), and, for ``in_kernel``, its scalar
form in the backends that fuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

Tensor = torch.Tensor


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _silu_grad(z: Tensor, _param: float) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class Kind(NamedTuple):
    """Everything the library needs to know about one activation (see the module docstring)."""

    module: type[nn.Module]
    module_param: str | None  # the module attribute holding the parameter
    default_param: float
    in_kernel: bool
    after_residual: str  # "one" | "mask" | "output" | "residual"
    invertible: Callable[[float], bool]  # of the parameter
    grad: Callable[[Tensor, float], Tensor] | None  # act'(z); None: a factor of one
    grad_from_output: Callable[[Tensor, float], Tensor] | None
    inverse: Callable[[Tensor, float], Tensor] | None
    negative_slope: Callable[[float], float] | None = None  # act'(z) for z <= 0, for "mask"


# For ReLU/LeakyReLU y > 0 iff z > 0; ELU's negative side has act'(z) = alpha * exp(z) = y + alpha.
KINDS: dict[str, Kind] = {
    "identity": Kind(
        nn.Identity, None, 0.0, in_kernel=True, after_residual="one", invertible=lambda p: True,
        grad=None, grad_from_output=None, inverse=lambda y, p: y,
    ),
    "relu": Kind(
        nn.ReLU, None, 0.0, in_kernel=True, after_residual="mask", invertible=lambda p: False,
        grad=lambda z, p: (z > 0).to(z.dtype),
        grad_from_output=lambda y, p: (y > 0).to(y.dtype),
        inverse=None, negative_slope=lambda p: 0.0,
    ),
    "leaky_relu": Kind(
        nn.LeakyReLU, "negative_slope", 0.01, in_kernel=True, after_residual="mask", invertible=lambda p: p > 0,
        grad=lambda z, p: torch.where(z > 0, 1.0, _scalar(p, z)),
        grad_from_output=lambda y, p: torch.where(y > 0, 1.0, _scalar(p, y)),
        inverse=lambda y, p: torch.where(y > 0, y, y / p), negative_slope=lambda p: p,
    ),
    "elu": Kind(
        nn.ELU, "alpha", 1.0, in_kernel=True, after_residual="output", invertible=lambda p: p > 0,
        grad=lambda z, p: torch.where(z > 0, 1.0, p * torch.exp(z)),
        grad_from_output=lambda y, p: torch.where(y > 0, 1.0, y + p),
        inverse=lambda y, p: torch.where(y > 0, y, torch.log1p(y / p)),
    ),
    "silu": Kind(
        nn.SiLU, None, 0.0, in_kernel=True, after_residual="residual", invertible=lambda p: False,
        grad=_silu_grad, grad_from_output=None, inverse=None,
    ),
}  # fmt: skip
NAMES = tuple(KINDS)
_NAME_OF_MODULE = {kind.module: name for name, kind in KINDS.items()}


class Activation(NamedTuple):
    name: str = "identity"
    param: float = 0.0

    @property
    def kind(self) -> Kind:
        return KINDS[self.name]

    @property
    def invertible(self) -> bool:
        """Whether ``y`` determines ``z`` (what the memory-saving mode needs)."""
        return self.kind.invertible(self.param)

    @property
    def keeps_mask(self) -> bool:
        """Whether, after a residual add, the backward reads ``act'`` from a 1-bit sign mask."""
        return self.kind.after_residual == "mask"

    @property
    def negative_slope(self) -> float:
        """``act'(z)`` where ``z <= 0``, for the activations whose backward can use a sign mask."""
        slope = self.kind.negative_slope
        if slope is None:
            raise ValueError(f"{self} has no constant slope below zero")
        return slope(self.param)

    def __str__(self) -> str:
        return self.name if self.kind.module_param is None else f"{self.name}({self.param:g})"


IDENTITY = Activation()


def parse(spec: str | tuple[str, float] | nn.Module | Activation | None) -> Activation:
    """``None``/``"relu"``/``("leaky_relu", 0.2)``/``nn.LeakyReLU(0.2)`` -> :class:`Activation`."""
    if spec is None:
        return IDENTITY
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, nn.Module):
        name = _NAME_OF_MODULE.get(type(spec))
        if name is None:
            raise ValueError(f"cannot fuse activation {type(spec).__name__}; expected one of {NAMES}")
        attr = KINDS[name].module_param
        return Activation(name, float(getattr(spec, attr)) if attr else 0.0)
    name, param = spec if isinstance(spec, tuple) else (spec, None)
    if name not in KINDS:
        raise ValueError(f"unknown activation {name!r}; expected one of {NAMES}")
    return Activation(name, float(KINDS[name].default_param if param is None else param))


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
    grad = act.kind.grad
    return None if grad is None else grad(z, act.param)


def grad_from_output(y: Tensor, act: Activation) -> Tensor | None:
    """``act'(z)`` from ``y = act(z)`` alone (``None`` for the identity)."""
    if act.kind.grad is None:
        return None
    grad = act.kind.grad_from_output
    if grad is None:
        raise ValueError(f"{act} cannot be differentiated from its output alone")
    return grad(y, act.param)


def inverse(y: Tensor, act: Activation) -> Tensor:
    """``z`` with ``act(z) == y``, for the invertible activations."""
    inv = act.kind.inverse
    if inv is None or not act.invertible:
        raise ValueError(f"{act} is not invertible")
    return inv(y, act.param)
