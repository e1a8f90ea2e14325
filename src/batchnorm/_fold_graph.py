"""The graph pass of ``batchnorm.fold``: each batch-norm call of a traced model folded or frozen.

:class:`Folder` walks the ``torch.fx`` graph once, in order. A batch-norm call folds into
the conv/linear layer that feeds it when that layer's output goes nowhere else; else into
the layer it feeds, where ``_fold_rules`` says that is exact; else it is frozen. Nothing
that other parts of the model use is changed: a folded layer is a new module with new
parameters, installed under a new name where the old one is called elsewhere or its
parameters are read directly. The layer classes come from ``fold`` (:class:`BatchNormLayers`):
they must live there to stay whole when a folded model is traced again.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx, nn

from . import activations
from ._fold_report import FOLDED, FROZEN, LEFT, FoldReport
from ._fold_rules import FOLDABLE, channel_rank, fold_after, fold_before, why_shift_does_not_fold_before
from ._fx import call_counts
from .activations import Activation


class BatchNormLayers(NamedTuple):
    """What the pass needs from ``fold``: which modules are batch norms, why one must be left
    (``""`` if not), its ``(scale, shift)``, the frozen layer class, and the layer that keeps a
    fused activation (and residual add) once the batch norm is folded."""

    is_batch_norm: Callable[[nn.Module], bool]
    why_left: Callable[[nn.Module, fx.Node], str]
    affine_of: Callable
    frozen: type[nn.Module]
    activation_only: Callable[[Activation], nn.Module]


class Folder:
    """One pass over a traced model's graph: each batch-norm call folded after, before, or frozen."""

    def __init__(self, traced: fx.GraphModule, done: FoldReport, layers: BatchNormLayers):
        self.root, self.done, self.layers = traced, done, layers
        self.modules = dict(traced.named_modules())
        self.calls = call_counts(traced)
        self.owners: dict[int, list[str]] = {}
        for name, parameter in traced.named_parameters(remove_duplicate=False):
            self.owners.setdefault(id(parameter), []).append(name.rpartition(".")[0])

    def run(self) -> None:
        for node in list(self.root.graph.nodes):
            if node.op == "call_module" and self.layers.is_batch_norm(self.modules[node.target]):
                self.visit(node)
        self.root.graph.lint()
        self.root.recompile()
        self.root.delete_all_unused_submodules()

    def visit(self, node: fx.Node) -> None:
        name = node.target if self.calls[node.target] == 1 else f"{node.target} (call {node.name})"
        bn = self.modules[node.target]
        why_left = self.layers.why_left(bn, node)
        if why_left:
            self.done.add(name, LEFT, reason=why_left)
            return
        scale, shift = self.layers.affine_of(bn)
        after, why_not_after = self.fold_after(node, bn, scale, shift)
        if after:
            self.done.add(name, FOLDED, *after)
            return
        before, why_not_before = self.fold_before(node, bn, scale, shift)
        if before:
            self.done.add(name, FOLDED, *before)
            return
        if not isinstance(bn, self.layers.frozen):
            frozen = self.layers.frozen.from_batch_norm(bn)
            _set(self.root, node.target, frozen)  # every call of it computes the same: freeze them all
            self.modules[node.target] = frozen
        self.done.add(name, FROZEN, reason=f"not after a layer: {why_not_after}; not before one: {why_not_before}")

    def fold_after(self, node, bn, scale, shift) -> tuple[tuple[str, str] | None, str]:
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and isinstance(self.modules[source.target],
                                                                                           FOLDABLE)):  # fmt: skip
            return None, f"its input comes from {_describe(source)}, not a conv/linear layer"
        layer = self.modules[source.target]
        if len(source.users) > 1:
            others = ", ".join(_describe(u) for u in source.users if u is not node)
            return None, f"the output of {source.target} is also used by {others}"
        why = _rank_mismatch(source, layer)
        if why:
            return None, why
        target, note = self.install(source, fold_after(layer, scale, shift))
        self.guard_rank(source, source, layer)
        act = getattr(bn, "activation", activations.IDENTITY)
        if act == activations.IDENTITY and len(node.args) == 1:
            node.replace_all_uses_with(source)
            self.root.graph.erase_node(node)
        else:  # the activation (and the residual add) stay after the folded layer
            self.install(node, self.layers.activation_only(act))
            note = "; ".join(filter(None, [note, f"{_fused(act, node)} kept after it"]))
        return (target, note), ""

    def fold_before(self, node, bn, scale, shift) -> tuple[tuple[str, str] | None, str]:
        act = getattr(bn, "activation", activations.IDENTITY)
        if act != activations.IDENTITY or len(node.args) > 1:
            return None, f"its fused {_fused(act, node)} comes between it and what follows"
        users = list(node.users)
        if len(users) != 1:
            return None, f"its output is used by {len(users)} nodes" if users else "its output is not used"
        user = users[0]
        if not (user.op == "call_module" and isinstance(self.modules[user.target], FOLDABLE)):
            return None, f"its output goes to {_describe(user)}, not a conv/linear layer"
        layer = self.modules[user.target]
        if user.args != (node,) or user.kwargs:
            return None, f"{user.target} is called with more than its input"
        why = _rank_mismatch(node, layer) or why_shift_does_not_fold_before(layer)
        if why and bool(shift.ne(0).any()):
            return None, f"{user.target}: {why}"
        target, note = self.install(user, fold_before(layer, scale, shift))
        self.guard_rank(user, node, layer)
        node.replace_all_uses_with(node.args[0])
        self.root.graph.erase_node(node)
        return (target, "; ".join(filter(None, ["folded before it", note]))), ""

    def guard_rank(self, call: fx.Node, between: fx.Node, layer: nn.Module) -> None:
        """Where a ``Linear`` absorbed a batch norm and no example inputs showed the rank of the
        tensor between them (``between``), make the folded model check it: a ``Linear`` on
        ``(N, C, L)`` input works on ``L``, not on the batch norm's ``C``, so there the fold would
        compute something else; it raises instead of answering wrongly."""
        if not isinstance(layer, nn.Linear) or between.meta.get("tensor_meta") is not None:
            return
        message = (f"batchnorm.fold folded a batch norm into {call.target} taking its input as (N, C); it got "
                   "another rank: fold the model with example_inputs=(...) to check the shapes")  # fmt: skip
        graph = self.root.graph
        with graph.inserting_before(call):
            rank = graph.call_method("dim", (call.args[0],))
            graph.call_function(torch._assert, (graph.call_function(operator.eq, (rank, 2)), message))

    def install(self, call: fx.Node, module: nn.Module) -> tuple[str, str]:
        """Put ``module`` in place of what ``call`` calls, under a new name where the old module has
        other uses (other calls, its parameters read directly); return its name and a note."""
        old = call.target
        notes = self.shared_parameters(old)
        if self.calls[old] == 1 and not self.read_directly(old):
            _set(self.root, old, module)
            self.modules[old] = module
            return old, "; ".join(notes)
        new = _free_name(self.root, f"{old.replace('.', '_')}_folded")
        self.root.add_submodule(new, module)
        self.modules[new], self.calls[new] = module, 1
        self.calls[old] -= 1
        call.target = new
        return new, "; ".join([f"{old} has other uses, which keep it: folded into a copy", *notes])

    def read_directly(self, target: str) -> bool:
        return any(n.op == "get_attr" and n.target.startswith(f"{target}.") for n in self.root.graph.nodes)

    def shared_parameters(self, target: str) -> list[str]:
        layer = self.modules[target]
        notes = []
        for name in ("weight", "bias"):
            parameter = getattr(layer, name, None)
            others = [o for o in self.owners.get(id(parameter), []) if o != target] if parameter is not None else []
            if others:
                notes.append(f"its {name} is shared with {', '.join(others)}, which keep the original")
        return notes


def _rank_mismatch(node: fx.Node, layer: nn.Module) -> str:
    """Why ``node``'s output (known from example inputs) does not have ``layer``'s channels in dim 1."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) == channel_rank(layer):
        return ""
    return (f"{type(layer).__name__} sees a {len(meta.shape)}-d input: its channels are the batch norm's (dim 1) "
            f"only for {channel_rank(layer)}-d input")  # fmt: skip


def _describe(node) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "call_module":
        return f"{node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "placeholder":
        return f"the model's input {node.target}"
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {node.target}"


def _fused(act: Activation, node: fx.Node) -> str:
    parts = (["residual add"] if len(node.args) > 1 else []) + ([act.name] if act != activations.IDENTITY else [])
    return " and ".join(parts) or "activation"


def _free_name(root: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(root, name):
        i += 1
        name = f"{base}{i}"
    return name


def _set(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)
