"""Our layers in ``torch.ao.quantization``: fused into the convolution before them, as torch's are.

Quantization folds a batch norm into the conv/linear layer before it; torch
finds what to fuse by the *exact* classes of the modules. So that a converted
model quantizes as the original would:

* eager mode (``fuse_modules``, ``fuse_modules_qat``): :func:`register` adds
  our classes to torch's table of fuser methods (done on ``import batchnorm``);
  each fuses a plain torch layer holding the same tensors, and a layer with a
  fused ReLU as batch norm + ReLU;
* FX mode (``prepare_fx``, ``prepare_qat_fx``): our layers appear in the traced
  graph as one module call each, as torch's do, so preparation works as is;
  torch's default backend config fuses only its own classes, so pass
  ``backend_config=batchnorm.quantization.backend_config()`` to ``prepare_fx``
  and ``convert_fx`` for the same fusion as torch's layers get (or
  ``batchnorm.convert(model, to="torch")`` first).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from . import activations
from ._swap import modules, swap_layer

__all__ = ["backend_config", "register"]

_OURS_TO_TORCH = {
    modules.BatchNorm1d: nn.BatchNorm1d,
    modules.BatchNorm2d: nn.BatchNorm2d,
    modules.BatchNorm3d: nn.BatchNorm3d,
}


def _torch_layer(module: nn.Module) -> nn.Module:
    """``module`` as torch's plain layer (same tensors) if it is one of ours, else ``module``."""
    if type(module) not in _OURS_TO_TORCH:
        return module
    return swap_layer(module, _OURS_TO_TORCH[type(module)], activations.IDENTITY)


def _fused_relu(module: nn.Module) -> bool:
    act = getattr(module, "activation", activations.IDENTITY)
    if act.name not in ("identity", "relu"):
        raise ValueError(
            f"quantization can fuse a batch norm with ReLU only; {type(module).__name__} fuses {act}: "
            "build it without activation= (and put the activation after it) before quantizing"
        )
    return act.name == "relu"


def _on_torch_layers(fuser: Callable, fuser_with_relu: Callable | None) -> Callable:
    """A fuser method that takes our layers: torch's ``fuser`` applied to torch's layers
    (``fuser_with_relu`` where our layer fuses a ReLU itself)."""

    @functools.wraps(fuser)
    def fuse(is_qat, *mods):
        relu = [m for m in mods if type(m) in _OURS_TO_TORCH and _fused_relu(m)]
        mods = tuple(_torch_layer(m) for m in mods)
        if relu:
            if fuser_with_relu is None:
                raise ValueError(f"cannot fuse a batch norm that applies ReLU itself after {type(mods[0]).__name__}")
            return fuser_with_relu(is_qat, *mods, nn.ReLU().train(mods[0].training))
        return fuser(is_qat, *mods)

    return fuse


def _substitute(pattern, mapping: dict) -> tuple:
    if isinstance(pattern, tuple):
        return tuple(_substitute(p, mapping) for p in pattern)
    return mapping.get(pattern, pattern)


def _has_torch_bn(pattern) -> bool:
    if isinstance(pattern, tuple):
        return any(_has_torch_bn(p) for p in pattern)
    return pattern in _OURS_TO_TORCH.values()


def register() -> None:
    """Add our classes to torch's table of eager-mode fuser methods (idempotent)."""
    from torch.ao.quantization import fuser_method_mappings as mappings

    table = getattr(mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if table is None:  # a torch without the table: eager fusion needs convert(model, to="torch") first
        return
    to_ours = {theirs: ours for ours, theirs in _OURS_TO_TORCH.items()}
    relu_of = {key[:-1]: fuser for key, fuser in table.items() if key[-1] is nn.ReLU and len(key) == 3}
    for key, fuser in list(table.items()):
        if _has_torch_bn(key):
            ours = _substitute(key, to_ours)
            table.setdefault(ours, _on_torch_layers(fuser, relu_of.get(key)))


def backend_config():
    """torch's native FX backend config, with each pattern that holds torch's batch norm also
    given for ours (fused through torch's layers, as :func:`register` does)."""
    from torch.ao.quantization.backend_config import BackendConfig, BackendPatternConfig, get_native_backend_config

    native = get_native_backend_config()
    config = BackendConfig(native.name)
    to_ours = {theirs: ours for ours, theirs in _OURS_TO_TORCH.items()}
    fusers = {c.pattern: c.fuser_method for c in native.configs if c.pattern is not None}
    for pattern_config in native.configs:
        config.set_backend_pattern_config(pattern_config)
        pattern = pattern_config.pattern
        if pattern is None or not _has_torch_bn(pattern):
            continue
        entry = pattern_config.to_dict()
        entry["pattern"] = _substitute(pattern, to_ours)
        if pattern_config.fuser_method is not None:
            with_relu = fusers.get((*pattern, nn.ReLU)) if isinstance(pattern, tuple) else None
            entry["fuser_method"] = _on_torch_layers(pattern_config.fuser_method, with_relu)
        config.set_backend_pattern_config(BackendPatternConfig.from_dict(entry))
    return config
