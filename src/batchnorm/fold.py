"""Inference: batch norm frozen to one multiply-add, or folded away entirely.

In eval a batch-norm layer is ``y = x * scale + shift`` per channel, with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``
(Ioffe & Szegedy 2015, Algorithm 2). :func:`freeze` replaces each layer by that
affine map; :func:`fold` goes further and merges it into the convolution or
linear layer that feeds it (``W' = W * scale``, ``b' = b * scale + shift``), so
the layer costs nothing at inference. ``freeze`` swaps the layers of the model
it is given (as ``convert`` does); ``fold`` returns a new model and leaves the
given one untouched (as ``fuse`` does).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn

from . import _fx, _torch_ops, activations, functional, modules
from ._fx import call_counts, trace_or_warn
from .activations import Activation
from .convert import convert

__all__ = ["FrozenBatchNorm", "fold", "freeze"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FrozenBatchNorm(nn.Module):
    """``act(x * scale + shift)`` per channel (dim 1): a batch-norm layer in eval, collapsed.

    Shape:
        - Input: ``(N, C, *)``, any memory format (channels-last is kept)
        - Output: same shape as the input
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, activation: Activation = activations.IDENTITY):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.activation = activation

    @classmethod
    def from_batch_norm(cls, layer: nn.Module) -> FrozenBatchNorm:
        scale, shift = _affine_of(layer)
        return cls(scale, shift, getattr(layer, "activation", activations.IDENTITY))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return _torch_ops.activate(_torch_ops.affine(x, self.scale, self.shift), residual, self.activation[0],
                                       self.activation[1], True)  # fmt: skip
        if isinstance(x, fx.Proxy):  # symbolic tracing: one call of this layer
            return _fx.record_call(self, x, residual)
        y = functional.affine(x, self.scale, self.shift)
        return _torch_ops.activate(y, residual, self.activation.name, self.activation.param, False)

    def extra_repr(self) -> str:
        text = f"{self.scale.numel()}"
        return text if self.activation == activations.IDENTITY else f"{text}, activation={self.activation}"


def _affine_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, FrozenBatchNorm):
        return layer.scale, layer.shift
    if layer.training and not getattr(layer, "freeze_statistics", False):
        raise ValueError(
            f"cannot freeze {type(layer).__name__} in training mode: it normalizes with each batch's statistics; "
            "call model.eval() first"
        )
    if layer.running_mean is None or layer.running_var is None:
        raise ValueError(f"cannot freeze {type(layer).__name__}: it keeps no running statistics")
    with torch.no_grad():
        return functional.inference_affine(layer.running_mean, layer.running_var, layer.weight, layer.bias, layer.eps)


def freeze(model: nn.Module, *, training: bool = False, statistics: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every batch-norm layer of ``model`` (torch.nn's or ours), in place; return the model.

    For inference (the default): each layer becomes a :class:`FrozenBatchNorm`, its eval map
    as one multiply-add. The model must be in eval mode; its predictions do not change.

    For fine-tuning (``training=True``): each layer becomes ours (torch's are converted,
    holding the same tensors, as :func:`batchnorm.convert` does; torchvision's and
    detectron2's ``FrozenBatchNorm2d`` too) with ``freeze_statistics=statistics`` (normalize
    with the running statistics in training too, never update them: mmdetection's
    ``norm_eval``) and ``freeze_affine=affine`` (``weight`` and ``bias`` do not learn). The
    rest of the model trains as before; ``model.train()`` does not undo it.

    Like ``convert`` (and torch's ``convert_sync_batchnorm``), this swaps layers in the model
    you pass (pass ``copy.deepcopy(model)`` to keep it).
    """
    if not training:
        if not (statistics and affine):
            raise ValueError("freeze for inference freezes statistics and affine both; for fine-tuning with "
                             "either left to learn, pass training=True")  # fmt: skip
        if isinstance(model, _BN_TYPES):
            return FrozenBatchNorm.from_batch_norm(model)
        for name, child in model.named_children():
            setattr(model, name, freeze(child))
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what convert leaves is frozen below if it is ours, else said here
        model, done = convert(model, report=True)
    left = [f"{name or '<model>'} ({cls})" for name, cls, _ in done.skipped]
    if left:
        warnings.warn(f"batchnorm.freeze left {len(left)} layer(s) it cannot convert: {', '.join(left)}", stacklevel=2)
    for layer in model.modules():
        if isinstance(layer, modules._BatchNorm):
            if statistics and layer.running_mean is None:
                raise ValueError(f"cannot freeze the statistics of {type(layer).__name__}: it keeps no running "
                                 "statistics")  # fmt: skip
            layer.freeze_statistics = statistics
            layer.freeze_affine = affine
    return model


def fold(model: nn.Module) -> nn.Module:
    """Fold each eval-mode (or frozen) batch norm into the conv/linear layer before it; freeze the rest.

    Uses torch.fx: a ``Conv*d``/``Linear`` whose only user is a batch norm (and
    which is not called elsewhere) absorbs it; a fused activation stays as an
    activation after the folded layer. Like torch.fx passes and torch's
    ``fuse_modules``, it returns a new model (an ``fx.GraphModule``; a frozen copy
    for a model that cannot be traced) and leaves the model you pass untouched.
    """
    model = copy.deepcopy(model)
    traced = trace_or_warn(model, "fold", "freezing its batch-norm layers instead of folding them")
    if traced is None:
        return freeze(model)
    modules = dict(traced.named_modules())
    calls = call_counts(traced)
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), (*_BN_TYPES, FrozenBatchNorm)):
            continue
        if len(node.args) != 1 or node.kwargs:  # a fused residual: keep the layer, frozen
            continue
        source = node.args[0]
        if not (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and isinstance(modules[source.target], _FOLDABLE)
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        ):
            continue
        bn = modules[node.target]
        _set(traced, source.target, _folded(modules[source.target], *_affine_of(bn)))
        act = getattr(bn, "activation", activations.IDENTITY)
        if act == activations.IDENTITY:
            node.replace_all_uses_with(source)
            traced.graph.erase_node(node)
        else:
            _set(traced, node.target, _ActivationOnly(act))
    traced.graph.lint()
    traced.recompile()
    traced.delete_all_unused_submodules()
    return freeze(traced)


class _ActivationOnly(nn.Module):
    def __init__(self, activation: Activation):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activations.forward(x, self.activation)

    def extra_repr(self) -> str:
        return str(self.activation)


def _folded(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` computing ``layer(x) * scale + shift`` (per output channel)."""
    new = type(layer).__new__(type(layer))
    new.__dict__ = layer.__dict__.copy()
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._modules = dict(layer._modules)
    weight = layer.weight.detach()
    with torch.no_grad():
        shape = [-1] + [1] * (weight.dim() - 1)
        new.weight = nn.Parameter((weight * scale.to(weight.dtype).view(shape)).to(weight.dtype))
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(shift, dtype=weight.dtype)
        new.bias = nn.Parameter((bias * scale.to(bias.dtype) + shift.to(bias.dtype)).to(weight.dtype))
    return new


def _set(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)
