"""Compute backends and the registry that picks one per tensor.

Every backend works on a canonical ``(N, C, L)`` view of the input (channel in
the middle, all spatial positions flattened into ``L``; channels-last input is
the same view with strides ``(L*C, 1, C)``) and offers four stages:

* ``stats(x) -> (mean, var)``: per-channel mean and *biased* variance, in the
  statistics dtype (float32 for half/bfloat16 input, else the input's dtype);
* ``apply(x, scale, shift) -> y``: ``y = x * scale[c] + shift[c]`` in x's dtype;
* ``backward_reduce(dy, x, mean) -> (sum_dy, sum_dy_xmu)``: per-channel
  ``sum(dy)`` and ``sum(dy * (x - mean))``;
* ``backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count=None) -> dx``
  (``count``: values per channel the sums cover, default ``N * L``).

and fused paths built from them unless a backend overrides them for speed:
``forward_train(x, weight, bias, eps, act) -> (y, mean, var, invstd)`` (``y =
act(BN(x))``, ``invstd`` the one it normalized with, which the backward gets
back) and ``backward_train(dy, x, mean, invstd, weight, bias, act) -> (dx,
sum_dz, sum_dz_xmu)`` (``act'`` recomputed from x); with a residual added
before the activation, ``forward_train_residual``/``backward_train_residual``,
which keep the sign of ``z`` as the bit mask of ``sign_mask`` (one format for
every backend). Which activations a backend fuses in its loops, and how each
one's derivative is obtained, is ``activations.KINDS``; the formulas shared by
the torch-side code are ``numerics``. Outputs keep x's strides when x is
contiguous or channels-last. Kernels know nothing of autograd or running
statistics; those live in ``_ops`` and ``running``.

Choosing: ``BATCHNORM_BACKEND=name`` or ``with batchnorm.backend("name"):``
forces one (a backend that cannot take a tensor falls back to ``torch``);
otherwise the first available backend in ``AUTOMATIC_ORDER`` that supports the
tensor's device and dtype and ``prefers`` its shape, plain or fused (where
torch's own kernel is faster, a backend declines: that is the only size rule),
and ``torch`` for everything else. When the automatic choice is ``torch``, the
layer runs torch's own batch-norm op and autograd (``_route``), faster than the
torch backend's stages behind ours.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Iterator

import torch

from ..numerics import stats_dtype
from .base import Backend

__all__ = ["Backend", "available", "backend", "get", "register", "select", "stats_dtype"]

# name -> "module:attribute" of a zero-argument factory, imported on first use.
_FACTORIES: dict[str, str] = {
    "torch": "batchnorm.kernels.portable:TorchBackend",
    "numba": "batchnorm.kernels.cpu:NumbaBackend",
    "triton": "batchnorm.kernels.triton:TritonBackend",
}
# fast backends, tried before "torch"; "triton" is opt-in (forced) until its kernels have
# passed the GPU check on real hardware, so CUDA tensors get torch's own kernels by default
AUTOMATIC_ORDER: list[str] = ["numba"]
_INSTANCES: dict[str, Backend | None] = {}
_LOAD_ERRORS: dict[str, str] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("batchnorm_backend", default=None)


def register(name: str, factory: str, automatic: bool = False) -> None:
    """Make a backend known under ``name``; ``factory`` is ``"module:callable"``."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)
    if automatic and name not in AUTOMATIC_ORDER:
        AUTOMATIC_ORDER.append(name)


def _load(name: str) -> Backend | None:
    if name not in _INSTANCES:
        module_name, attr = _FACTORIES[name].split(":")
        try:
            _INSTANCES[name] = getattr(importlib.import_module(module_name), attr)()
        except ImportError as error:  # an optional dependency is missing
            _INSTANCES[name] = None
            _LOAD_ERRORS[name] = str(error)
    return _INSTANCES[name]


def get(name: str) -> Backend:
    """The backend called ``name``; raises if unknown or not installed."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown batchnorm backend {name!r}; expected one of {sorted(_FACTORIES)}")
    found = _load(name)
    if found is None:
        raise RuntimeError(f"batchnorm backend {name!r} is not available: {_LOAD_ERRORS[name]}")
    return found


def available() -> list[str]:
    """Names of the backends that can be loaded on this machine."""
    return [name for name in _FACTORIES if _load(name) is not None]


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Force the backend ``name`` inside the block (``None``: automatic choice)."""
    if name is not None:
        get(name)  # fail here, not at the first layer
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_name() -> str | None:
    """The backend forced by the context manager, else by the environment."""
    return _forced.get() or os.environ.get("BATCHNORM_BACKEND") or None


def select(x: torch.Tensor, fused: bool = False, training: bool = True, any_size: bool = False) -> Backend:
    """The backend that will run batch norm on ``x`` (``fused``: with an activation or a
    residual add, where a backend's own fused kernels may win on shapes its plain ones lose;
    ``training``: a training call, else eval's multiply-add; ``any_size``: no size rule, for
    the calls torch has no kernel of its own for, ghost batches and masks)."""
    name = forced_name()
    if name is not None:
        chosen = get(name)
        return chosen if chosen.supports(x) else get("torch")
    return automatic(x, fused, training, any_size)


def automatic(x: torch.Tensor, fused: bool = False, training: bool = True, any_size: bool = False) -> Backend:
    """The automatic choice for ``x``, whatever is forced: the first backend of
    ``AUTOMATIC_ORDER`` that supports and prefers it (``prefers``, or ``prefers_eval`` for
    an eval call; with ``any_size``, that supports it), else ``torch``."""
    for candidate in AUTOMATIC_ORDER:
        found = _INSTANCES[candidate] if candidate in _INSTANCES else _load(candidate)
        if found is None or not found.supports(x):
            continue
        if any_size or (found.prefers(x, fused) if training else found.prefers_eval(x, fused)):
            return found
    return _INSTANCES["torch"] if "torch" in _INSTANCES else get("torch")
