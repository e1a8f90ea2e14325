"""Swapping the batch-norm layers of an existing model between torch.nn's and ours.

The new layer takes over the very same parameter and buffer tensors (so an
optimizer built before the swap keeps working), the train/eval state and the
hooks; nothing is copied or re-initialized. ``SyncBatchNorm`` maps to ours one
way and reverts to a plain ``BatchNormXd`` the other (torch has no revert).
"""

from __future__ import annotations

import torch
from torch import nn

from . import activations, modules, sync

__all__ = ["convert"]

_TORCH_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: modules.BatchNorm1d,
    nn.BatchNorm2d: modules.BatchNorm2d,
    nn.BatchNorm3d: modules.BatchNorm3d,
    nn.SyncBatchNorm: sync.SyncBatchNorm,
}
_OURS_TO_TORCH = {ours: theirs for theirs, ours in _TORCH_TO_OURS.items()}
# torch's SyncBatchNorm refuses CPU tensors and CPU DDP: ours reverts to a plain layer
_OURS_TO_TORCH[sync.SyncBatchNorm] = None  # chosen per layer by sync.plain_class
_TARGETS = {"batchnorm": _TORCH_TO_OURS, "torch": _OURS_TO_TORCH}
# the hook registries of nn.Module that the new layer takes over (the handles stay valid)
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def convert(model: nn.Module, to: str = "batchnorm") -> nn.Module:
    """Replace every batch-norm layer of ``model`` in place and return the model.

    Args:
        model: any module; if it is itself a batch-norm layer, the replacement
            is returned.
        to: ``"batchnorm"`` swaps ``torch.nn.BatchNorm1d/2d/3d`` and
            ``torch.nn.SyncBatchNorm`` for ours (the process group is kept);
            ``"torch"`` swaps ours back, and reverts our ``SyncBatchNorm`` to
            ``torch.nn.BatchNorm1d/2d/3d`` (the dimension of the layer it was
            converted from, else of the last input it saw).
    """
    if to not in _TARGETS:
        raise ValueError(f"convert(to=...) expects one of {sorted(_TARGETS)}, got {to!r}")
    mapping = _TARGETS[to]
    if type(model) in mapping:
        target = mapping[type(model)] or sync.plain_class(model, torch_layers=True)
        new = swap_layer(model, target)
        if isinstance(new, sync.SyncBatchNorm):
            new.process_group = model.process_group
        return new
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child, to))
    return model


def swap_layer(old: nn.Module, new_cls: type[nn.Module]) -> nn.Module:
    """A ``new_cls`` layer holding ``old``'s tensors, mode, hooks and fused activation (nothing copied)."""
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
