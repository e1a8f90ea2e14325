"""Swapping one batch-norm layer for another class that holds the very same tensors.

Used by ``convert`` (torch's layers <-> ours), ``SyncBatchNorm``'s
``convert_sync_batchnorm``/``revert_sync_batchnorm`` and ``quantization``: the
new layer takes over the parameters, buffers, train/eval mode, hooks and fused
activation of the old one; nothing is copied or re-initialized.
"""

from __future__ import annotations

import torch
from torch import nn

from . import activations, modules

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def swap_layer(old: nn.Module, new_cls: type[nn.Module], activation: activations.Activation | None = None) -> nn.Module:
    """A ``new_cls`` layer holding ``old``'s tensors, mode, hooks and fused activation (nothing copied)."""
    if activation is None:
        activation = getattr(old, "activation", activations.IDENTITY)
    fused = issubclass(new_cls, modules._BatchNorm)
    if not fused and getattr(old, "virtual_batch_size", None) is not None:
        raise ValueError(f"{type(old).__name__} with virtual_batch_size has no torch.nn equivalent")
    if not fused and activation != activations.IDENTITY:
        raise ValueError(
            f"{type(old).__name__} with the fused activation {activation} has no torch.nn equivalent; "
            "build it without activation= and put the activation after it"
        )
    new = new_cls(
        old.num_features,
        old.eps,
        old.momentum,
        old.affine,
        old.running_mean is not None,
        device="meta",
        bias=old.bias is not None or not old.affine,
    )
    new.track_running_stats = old.track_running_stats  # may have been flipped after construction
    new.train(old.training)
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(old, name))
    if "num_nonfinite_batches" in new._buffers and new.num_nonfinite_batches is not None:
        device = old.running_mean.device if old.running_mean is not None else torch.device("cpu")
        new.num_nonfinite_batches = torch.zeros((), dtype=torch.long, device=device)
    _take_hooks(old, new)
    if fused:
        new.activation = activation
        new.freeze_statistics = getattr(old, "freeze_statistics", False)
        new.virtual_batch_size = getattr(old, "virtual_batch_size", None)
    return new


def _take_hooks(old: nn.Module, new: nn.Module) -> None:
    for hooks in _HOOK_DICTS:
        if hasattr(old, hooks):
            setattr(new, hooks, getattr(old, hooks))


def from_frozen(old: nn.Module) -> nn.Module:
    """Our ``BatchNorm2d`` with statistics and affine frozen, holding a ``FrozenBatchNorm2d``'s
    tensors (torchvision's, detectron2's: ``weight``, ``bias``, ``running_mean``,
    ``running_var`` buffers and ``eps``); its weight and bias become parameters that do not
    learn, on the same storage. Same outputs, in training mode too."""
    new = modules.BatchNorm2d(old.running_mean.numel(), old.eps, device="meta", freeze_statistics=True)
    new.weight = nn.Parameter(old.weight, requires_grad=False)
    new.bias = nn.Parameter(old.bias, requires_grad=False)
    new.running_mean, new.running_var = old.running_mean, old.running_var
    for name in ("num_batches_tracked", "num_nonfinite_batches"):
        setattr(new, name, torch.zeros((), dtype=torch.long, device=old.running_mean.device))
    new.train(old.training)
    _take_hooks(old, new)
    return new
