"""Inference: batch norm frozen to one multiply-add, or folded away entirely.

In eval a batch-norm layer is ``y = x * scale + shift`` per channel, with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``
(Ioffe & Szegedy 2015, Algorithm 2). :func:`freeze` replaces each layer by that
affine map; :func:`fold` goes further and merges it into the convolution or
linear layer next to it (after it: ``W' = W * scale``, ``b' = b * scale + shift``;
before it where that is exact: see ``_fold_rules``), so the layer costs nothing
at inference, and can report what it folded, froze or left, and why
(``_fold_report``). ``freeze`` swaps the layers of the model
it is given (as ``convert`` does); ``fold`` returns a new model and leaves the
given one untouched (as ``fuse`` does).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import _fx, _torch_ops, activations, functional, modules
from ._fold_graph import BatchNormLayers, Folder
from ._fold_report import FROZEN, LEFT, FoldEntry, FoldReport
from .activations import Activation
from .convert import convert

__all__ = ["FoldEntry", "FoldReport", "FrozenBatchNorm", "fold", "freeze"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# frozen batch norms of other libraries (buffers weight, bias, running_mean, running_var; eps)
_FROZEN_2D = {"torchvision.ops.misc.FrozenBatchNorm2d", "detectron2.layers.batch_norm.FrozenBatchNorm2d"}


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
    if _qualname(type(layer)) in _FROZEN_2D:
        with torch.no_grad():
            return functional.inference_affine(layer.running_mean, layer.running_var, layer.weight, layer.bias,
                                               layer.eps)  # fmt: skip
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
        left: list[str] = []
        model = _frozen_for_inference(model, "", left)
        if left:
            warnings.warn(f"batchnorm.freeze left {len(left)} layer(s) with a forward of their own as they are (it "
                          f"cannot know what they compute): {', '.join(left)}", stacklevel=2)  # fmt: skip
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


def _frozen_for_inference(model: nn.Module, name: str, left: list[str]) -> nn.Module:
    """``model`` with each batch-norm layer that computes as torch's replaced by a
    :class:`FrozenBatchNorm`; the names of those with a forward of their own (timm's
    ``BatchNormAct2d``: an activation after the norm) are added to ``left``, and they stay."""
    if isinstance(model, _BN_TYPES):
        if _computes_as_torch(model):
            return FrozenBatchNorm.from_batch_norm(model)
        left.append(f"{name or '<model>'} ({_qualname(type(model))})")
        return model
    for child_name, child in model.named_children():
        setattr(model, child_name, _frozen_for_inference(child, f"{name}.{child_name}" if name else child_name, left))
    return model


def fold(
    model: nn.Module, *, report: bool = False, example_inputs: tuple | None = None
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Fold each eval-mode (or frozen) batch norm into an adjacent conv/linear layer; freeze the rest.

    A batch norm folds into the ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d``
    (any groups, depthwise included, stride and dilation) that feeds it, or else into the one
    it feeds where that is exact (see ``docs/inference.md``: not into a zero-padded conv or a
    strided transposed conv unless the shift is zero). torch's layers, ours (a fused activation
    and residual add stay after the folded layer), :class:`FrozenBatchNorm` and torchvision's
    and detectron2's ``FrozenBatchNorm2d`` all fold. A batch norm that cannot fold is frozen
    into a :class:`FrozenBatchNorm`; one whose computation fold cannot keep (a subclass with a
    forward of its own, a call with a mask) is left as it is.

    A layer called more than once, or whose parameters are read elsewhere, is folded into a
    copy for the one call; the folded layers get new parameters, so tensors shared with other
    layers never change. float16/bfloat16 weights are folded in float32, then cast back.

    Uses torch.fx; like torch.fx passes and torch's ``fuse_modules``, it returns a new model
    (an ``fx.GraphModule``; a frozen copy for a model that cannot be traced) and leaves the
    model you pass untouched.

    Args:
        model: a model in eval mode.
        report: also return a :class:`FoldReport`: each batch norm, what it was folded into,
            or why it was frozen or left.
        example_inputs: inputs to run the model on once (``torch.fx``'s ``ShapeProp``), so fold
            checks that each batch norm's channel dim is the layer's (only the input's rank can
            differ: a ``Linear`` applied to ``(N, C, L)`` works on ``L``, not on ``C``). Without
            them a ``Linear`` next to a ``BatchNorm1d`` is taken to see ``(N, C)`` inputs.
    """
    model = copy.deepcopy(model)
    done = FoldReport()
    traced = _trace_or_warn(model)
    if traced is None:
        model = _freeze_untraceable(model, done)
    else:
        if example_inputs is not None:
            ShapeProp(traced).propagate(*example_inputs)
        Folder(traced, done, _LAYERS).run()
        model = traced
    return (model, done) if report else model


def _trace_or_warn(model: nn.Module) -> fx.GraphModule | None:
    try:
        return fx.GraphModule(model, _FoldTracer().trace(model), type(model).__name__)
    except _fx.UNTRACEABLE as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"batchnorm.fold: torch.fx cannot trace {type(model).__name__}.forward ({reason}); "
                      "freezing its batch-norm layers instead of folding them", stacklevel=3)  # fmt: skip
        return None


class _FoldTracer(_fx._Tracer):
    """``_fx``'s tracer, with torchvision's and detectron2's ``FrozenBatchNorm2d`` kept whole too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _qualname(type(m)) in _FROZEN_2D or super().is_leaf_module(m, module_qualified_name)


def _freeze_untraceable(model: nn.Module, done: FoldReport) -> nn.Module:
    names = [name for name, m in model.named_modules() if _is_batch_norm(m)]
    model = freeze(model)
    for name in names:
        layer = model.get_submodule(name) if name else model
        action = FROZEN if isinstance(layer, FrozenBatchNorm) else LEFT
        done.add(name, action, reason="torch.fx cannot trace the model, so nothing is folded")
    return model


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)) or _qualname(
        type(module)) in _FROZEN_2D  # fmt: skip


def _why_left(bn: nn.Module, node: fx.Node) -> str:
    """Why fold must leave this batch-norm call as it is ("" where it can fold or freeze it)."""
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not _computes_as_torch(bn):
        return f"it has a forward of its own ({_qualname(type(bn))}.forward): fold cannot know what it computes"
    if node.kwargs:
        return f"it is called with {', '.join(node.kwargs)}, which a frozen layer does not take"
    return ""


def _computes_as_torch(bn: nn.Module) -> bool:
    """Whether a batch-norm layer computes what its eval map says: ours, or torch's forward."""
    forward = type(bn).forward
    return isinstance(bn, modules._BatchNorm) or forward in (
        nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)  # fmt: skip


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class _ActivationOnly(nn.Module):
    """``act(x + residual)``: what a batch norm with a fused activation (and residual) leaves once folded."""

    def __init__(self, activation: Activation):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return _torch_ops.activate(x, residual, self.activation.name, self.activation.param, False)

    def extra_repr(self) -> str:
        return str(self.activation)


_LAYERS = BatchNormLayers(_is_batch_norm, _why_left, _affine_of, FrozenBatchNorm, _ActivationOnly)
