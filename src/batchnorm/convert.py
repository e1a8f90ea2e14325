"""Swapping the batch-norm layers of an existing model between torch.nn's and ours.

The new layer takes over the very same parameter and buffer tensors (so an
optimizer built before the swap keeps working), the train/eval state and the
hooks; nothing is copied or re-initialized. ``SyncBatchNorm`` maps to ours one
way and reverts to a plain ``BatchNormXd`` the other (torch has no revert).

Subclasses of torch's batch norm are everywhere (timm, detectron2, mmcv). One
whose computation we can keep exactly is converted: timm's ``BatchNormAct2d``
(batch norm, then dropout, then an activation) becomes our layer with the
activation fused, and a subclass that does not change ``forward`` becomes our
layer of its base class. Any other subclass is left as it is, and said so: a
warning names what was left, and ``report=True`` returns the whole list.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import activations, modules, sync
from ._swap import from_frozen, swap_layer

__all__ = ["ConversionReport", "convert"]

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
# subclasses that apply ``self.drop`` then ``self.act`` after the normalization (timm)
_NORM_DROP_ACT = {"timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.SyncBatchNormAct"}
# frozen batch norms (buffers weight, bias, running_mean, running_var; eps): ours with both frozen
_FROZEN_2D = {"torchvision.ops.misc.FrozenBatchNorm2d", "detectron2.layers.batch_norm.FrozenBatchNorm2d"}
# the hook registries of nn.Module that the new layer takes over (the handles stay valid)


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` holds ``(name, old class, new class)``,
    ``skipped`` holds ``(name, class, why)``; ``str()`` gives a readable table."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s), left {len(self.skipped)}"]
        lines += [f"  {name or '<model>'}: {old} -> {new}" for name, old, new in self.converted]
        lines += [f"  {name or '<model>'}: {cls} left as it is: {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)


def convert(
    model: nn.Module, to: str = "batchnorm", *, report: bool = False
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace every batch-norm layer of ``model`` in place and return the model.

    Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, this changes ``model``
    itself: each layer is swapped for one that holds the very same tensors, so
    the model, its ``state_dict`` keys and an optimizer built on it carry on.

    Args:
        model: any module; if it is itself a batch-norm layer, the replacement
            is returned.
        to: ``"batchnorm"`` swaps ``torch.nn.BatchNorm1d/2d/3d`` and
            ``torch.nn.SyncBatchNorm`` (and the subclasses it can keep exactly:
            timm's ``BatchNormAct2d``, subclasses that keep torch's ``forward``)
            for ours (the process group is kept), and torchvision's and detectron2's
            ``FrozenBatchNorm2d`` for ours with ``freeze_statistics`` and
            ``freeze_affine`` (the same outputs); ``"torch"`` swaps ours back,
            and reverts our ``SyncBatchNorm`` to ``torch.nn.BatchNorm1d/2d/3d``
            (the dimension of the layer it was converted from, else of the last
            input it saw).
        report: also return a :class:`ConversionReport` of what was converted
            and what was left, and why.

    A batch-norm layer that is left as it was always triggers a warning.
    """
    if to not in _TARGETS:
        raise ValueError(f"convert(to=...) expects one of {sorted(_TARGETS)}, got {to!r}")
    done = ConversionReport()
    model = _convert(model, to, "", done)
    if done.skipped:
        names = ", ".join(f"{name or '<model>'} ({cls})" for name, cls, _ in done.skipped[:5])
        more = f" and {len(done.skipped) - 5} more" if len(done.skipped) > 5 else ""
        warnings.warn(
            f"batchnorm.convert left {len(done.skipped)} batch-norm layer(s) as they were: {names}{more}; "
            "convert(model, report=True) says why",
            stacklevel=2,
        )
    return (model, done) if report else model


def _convert(module: nn.Module, to: str, name: str, done: ConversionReport) -> nn.Module:
    if to == "batchnorm" and _qualname(type(module)) in _FROZEN_2D:
        new = from_frozen(module)
        done.converted.append((name, _qualname(type(module)), _qualname(type(new))))
        return new
    target, why_not = _target_of(module, to)
    if target is not None:
        new = swap_layer(module, target, _fused_activation(module))
        if isinstance(new, sync.SyncBatchNorm) and isinstance(module, nn.SyncBatchNorm):
            new.process_group = module.process_group
        done.converted.append((name, _qualname(type(module)), _qualname(type(new))))
        return new
    if why_not is not None:
        done.skipped.append((name, _qualname(type(module)), why_not))
        return module
    for child_name, child in list(module.named_children()):
        setattr(module, child_name, _convert(child, to, f"{name}.{child_name}" if name else child_name, done))
    return module


def _target_of(module: nn.Module, to: str) -> tuple[type[nn.Module] | None, str | None]:
    """``(class to swap to, None)``, ``(None, why it is left)``, or ``(None, None)`` (not a layer
    this conversion is about: recurse into its children)."""
    mapping = _TARGETS[to]
    cls = type(module)
    if cls in mapping:
        return mapping[cls] or sync.plain_class(module, torch_layers=True), None
    if to == "torch" or not isinstance(module, _BatchNorm) or isinstance(module, modules._BatchNorm):
        return None, None
    base = next(c for c in cls.__mro__ if c in _TORCH_TO_OURS)
    if _qualname(cls) in _NORM_DROP_ACT:
        drop, act = getattr(module, "drop", None), getattr(module, "act", None)
        if not isinstance(drop, nn.Identity):
            return None, f"its drop layer {type(drop).__name__} cannot be fused (only nn.Identity)"
        try:
            activations.parse(act)
        except ValueError:
            return None, f"its activation {type(act).__name__} cannot be fused (one of {activations.NAMES})"
        return _TORCH_TO_OURS[base], None
    if cls.forward is not base.forward:
        return None, f"it has a forward of its own ({_qualname(cls)}.forward); converting would drop what it adds"
    return _TORCH_TO_OURS[base], None


def convert_norm_act_layers(module: nn.Module) -> None:
    """Swap, in place, only the layers that already are batch norm + activation (timm's
    ``BatchNormAct2d``) for ours with the activation fused, where they can be kept exactly."""
    for name, child in module.named_children():
        if _qualname(type(child)) in _NORM_DROP_ACT:
            target, _ = _target_of(child, "batchnorm")
            if target is not None:
                setattr(module, name, swap_layer(child, target, _fused_activation(child)))
        else:
            convert_norm_act_layers(child)


def _fused_activation(module: nn.Module) -> activations.Activation:
    """The activation the new layer fuses: ours carries one; timm's norm + act layers apply ``act``."""
    if _qualname(type(module)) in _NORM_DROP_ACT:
        return activations.parse(module.act)
    return getattr(module, "activation", activations.IDENTITY)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
