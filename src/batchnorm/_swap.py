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
    for hooks in _HOOK_DICTS:
        if hasattr(old, hooks):
            setattr(new, hooks, getattr(old, hooks))
    if fused:
        new.activation = activation
    return new
