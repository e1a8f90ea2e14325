"""Folding batch norms out of a saved ``torch.export`` program (``.pt2``), for ``batchnorm fold``.

A program holds no ``nn.Module`` layers, only aten ops: ``aten.conv2d`` (or ``convolution``,
``conv_transpose2d``, ``linear``) feeding ``aten.batch_norm`` (or, once decomposed,
``_native_batch_norm_legit_no_training``). :func:`fold_program` works on ``program.module()``,
the program as an ``fx.GraphModule`` of those ops with its weights as attributes: each eval-mode
batch norm that is the only user of a conv/linear output is merged into that op (the arithmetic
is ``_fold_rules.fold_after``'s, the one ``batchnorm.fold`` uses), the batch norm and its tensors
are removed, and the module is exported again with the program's example inputs. Re-exporting,
rather than editing the program's lifted graph and signature by hand, leaves torch to build a
valid program (signature, state dict, guards) on any torch that can export; dimensions that
were dynamic in the program stay dynamic (``Dim.AUTO``) where its inputs are plain tensors.

Folded ops get new tensors; a tensor that anything else reads is never changed. A batch norm
that cannot fold (in training mode, after an op that is not a conv/linear, after an output used
elsewhere) is left as it is, and the report says why (:class:`batchnorm.FoldReport`).
:func:`max_error` measures parity of two programs on the same inputs.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn
from torch.utils import _pytree

from ._fold_report import FOLDED, LEFT, FoldReport
from ._fold_rules import fold_after
from .functional import inference_affine

__all__ = ["example_inputs_of", "fold_program", "has_batch_norm", "max_error"]

_aten = torch.ops.aten
# batch-norm ops as export writes them; the ones that return a tuple are read through getitem(0)
_BATCH_NORMS = {_aten.batch_norm, _aten._native_batch_norm_legit_no_training, _aten.native_batch_norm}
_CONVOLUTIONS = {_aten.conv1d, _aten.conv2d, _aten.conv3d}
_TRANSPOSED = {_aten.conv_transpose1d, _aten.conv_transpose2d, _aten.conv_transpose3d}
_FOLDABLE = _CONVOLUTIONS | _TRANSPOSED | {_aten.convolution, _aten.linear}
# parity tolerance, relative to the largest output magnitude
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def is_batch_norm(node: fx.Node) -> bool:
    return _packet(node) in _BATCH_NORMS


def has_batch_norm(program: torch.export.ExportedProgram) -> bool:
    return any(is_batch_norm(node) for node in program.graph.nodes)


def example_inputs_of(program: torch.export.ExportedProgram) -> tuple[tuple, dict] | None:
    """The ``(args, kwargs)`` the program was exported with (``None`` where it was saved without them)."""
    inputs = getattr(program, "example_inputs", None)
    if inputs is None:
        return None
    args, kwargs = inputs
    return tuple(args), dict(kwargs or {})


def fold_program(
    program: torch.export.ExportedProgram, inputs: tuple[tuple, dict]
) -> tuple[torch.export.ExportedProgram, FoldReport]:
    """A new program with each foldable batch norm of ``program`` merged into the conv/linear
    op before it, and the report of what was folded or left and why; ``inputs`` (``(args, kwargs)``)
    are the example inputs it is exported again with. ``program`` is not changed."""
    module = program.module()
    done = FoldReport()
    _GraphFolder(module, done).run()
    args, kwargs = inputs
    folded = torch.export.export(module, args, kwargs, dynamic_shapes=_dynamic_shapes(module, args, kwargs))
    return folded, done


class _GraphFolder:
    """One pass over the aten graph of ``program.module()``: each batch norm folded into the op before it, or left."""

    def __init__(self, module: fx.GraphModule, done: FoldReport):
        self.module, self.graph, self.done = module, module.graph, done
        self.names = _batch_norm_names([n for n in self.graph.nodes if is_batch_norm(n)])
        self.removed_targets: set[str] = set()

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if is_batch_norm(node):
                self.visit(node)
        self.drop_unused_tensors()
        self.graph.lint()
        self.module.recompile()

    def visit(self, node: fx.Node) -> None:
        name = self.names[node]
        why = self.why_left(node)
        if why:
            self.done.add(name, LEFT, reason=why)
            return
        bn = _named_args(node)
        layer_node = bn["input"]
        names = ("running_mean", "running_var", "weight", "bias")
        stats = (self.tensor(bn[k]) if bn[k] is not None else None for k in names)
        scale, shift = inference_affine(*stats, eps=bn["eps"])
        self.fold_into(layer_node, scale, shift)
        self.removed_targets |= {n.target for n in node.all_input_nodes if n.op == "get_attr"}
        uses = list(node.users) if _returns_tuple(node) else [node]  # a tuple is read through getitem(0)
        for use in uses:
            use.replace_all_uses_with(layer_node)
            if use is not node:
                self.graph.erase_node(use)
        self.graph.erase_node(node)
        self.done.add(name, FOLDED, f"{layer_node.name} ({_op_name(layer_node)}{_module_path(layer_node)})")

    def why_left(self, node: fx.Node) -> str:
        """Why this batch norm cannot fold into the op before it ("" where it can)."""
        bn = _named_args(node)
        if bn.get("training", False):
            return "it was exported in training mode: it normalizes with each batch's statistics"
        stored = [k for k in ("weight", "bias", "running_mean", "running_var") if bn[k] is not None]
        if bn["running_mean"] is None or bn["running_var"] is None:
            return "it keeps no running statistics"
        computed = [k for k in stored if not (isinstance(bn[k], fx.Node) and bn[k].op == "get_attr")]
        if computed:
            return f"its {', '.join(computed)} is computed in the graph, not a stored tensor"
        if not _only_output_read(node):
            return "its saved statistics (outputs 1 and 2) are used"
        source = bn["input"]
        if not (isinstance(source, fx.Node) and _packet(source) in _FOLDABLE):
            return f"its input comes from {_describe(source)}, not a conv/linear op"
        if len(source.users) > 1:
            others = ", ".join(u.name for u in source.users if u is not node)
            return f"the output of {source.name} is also used by {others}"
        layer = _named_args(source)
        if not (isinstance(layer["weight"], fx.Node) and layer["weight"].op == "get_attr"):
            return f"the weight of {source.name} is computed in the graph, not a stored tensor"
        if layer["bias"] is not None and not (isinstance(layer["bias"], fx.Node) and layer["bias"].op == "get_attr"):
            return f"the bias of {source.name} is computed in the graph, not a stored tensor"
        shape = getattr(source.meta.get("val"), "shape", None)
        if _packet(source) is _aten.linear and shape is not None and len(shape) != 2:
            return (f"{source.name} (aten.linear) gives a {len(shape)}-d output: its features are the last dim, "
                    "the batch norm's channels dim 1")  # fmt: skip
        return ""

    def fold_into(self, layer_node: fx.Node, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Give ``layer_node`` new weight and bias computing ``op(x) * scale + shift`` per output channel."""
        args = _named_args(layer_node)
        weight, bias = self.tensor(args["weight"]), self.tensor(args["bias"]) if args["bias"] is not None else None
        folded = fold_after(_as_layer(layer_node, weight, bias), scale, shift)
        weight_path = args["weight"].target
        self.replace_tensor(layer_node, "weight", folded.weight, weight_path)
        self.replace_tensor(layer_node, "bias", folded.bias, f"{_owner(weight_path)}.bias".lstrip("."))

    def replace_tensor(self, layer_node: fx.Node, arg: str, tensor: torch.Tensor, path: str) -> None:
        """Point ``layer_node``'s ``arg`` at a new parameter holding ``tensor``: at ``path`` where only
        this op reads what is there, else under a new name; the old tensor itself is never changed."""
        old = _named_args(layer_node)[arg]
        if isinstance(old, fx.Node):
            path = old.target
        if not self.read_only_by(path, layer_node):
            path = self.free_path(f"{path}_folded")
        _set_attr(self.module, path, nn.Parameter(tensor.detach(), requires_grad=False))
        with self.graph.inserting_before(layer_node):
            new = self.graph.get_attr(path)
        new.meta["val"] = tensor
        _set_arg(layer_node, arg, new)
        if isinstance(old, fx.Node) and not old.users:
            self.graph.erase_node(old)

    def read_only_by(self, path: str, layer_node: fx.Node) -> bool:
        """Whether nothing but ``layer_node`` reads the tensor at ``path`` (or nothing is there yet)."""
        readers = [n for n in self.graph.nodes if n.op == "get_attr" and n.target == path]
        if not readers:
            return _get_attr(self.module, path) is None
        return all(set(r.users) <= {layer_node} for r in readers)

    def free_path(self, base: str) -> str:
        path, i = base, 1
        while _get_attr(self.module, path) is not None:
            i += 1
            path = f"{base}{i}"
        return path

    def tensor(self, node: fx.Node) -> torch.Tensor:
        return _get_attr(self.module, node.target)

    def drop_unused_tensors(self) -> None:
        """Remove the folded batch norms' tensors that nothing reads any more (with the step counter
        ``num_batches_tracked`` of a batch norm whose statistics are gone), and their get_attr nodes."""
        counters = {f"{_owner(t)}.num_batches_tracked".lstrip(".") for t in self.removed_targets}
        for node in list(self.graph.nodes):
            if node.op == "get_attr" and node.target in self.removed_targets and not node.users:
                self.graph.erase_node(node)
        read = {n.target for n in self.graph.nodes if n.op == "get_attr" and n.users}
        owners_read = {_owner(t) for t in read}
        gone = (self.removed_targets - read) | {c for c in counters if _owner(c) not in owners_read}
        for node in list(self.graph.nodes):
            if node.op == "get_attr" and node.target in gone and not node.users:
                self.graph.erase_node(node)
        for path in gone:
            _del_attr(self.module, path)


def _named_args(node: fx.Node) -> dict:
    """``node``'s arguments by the names of its op's schema, defaults filled in."""
    named = {}
    for i, argument in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            named[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            named[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            named[argument.name] = argument.default_value
    return named


def _returns_tuple(node: fx.Node) -> bool:
    return _packet(node) is not _aten.batch_norm


def _only_output_read(node: fx.Node) -> bool:
    """Whether only the normalized output of this batch norm is used (not the statistics it returns)."""
    if not _returns_tuple(node):
        return True
    return all(u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users)
               for u in node.users)  # fmt: skip


def _set_arg(node: fx.Node, name: str, value) -> None:
    """Set ``node``'s argument ``name`` (positionally where it is, or where its defaults lead up to it)."""
    if name in node.kwargs:
        node.update_kwarg(name, value)
        return
    arguments = node.target._schema.arguments
    index = next(i for i, a in enumerate(arguments) if a.name == name)
    args = list(node.args)
    while len(args) <= index:
        args.append(arguments[len(args)].default_value)
    args[index] = value
    node.args = tuple(args)


def _as_layer(node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The ``nn`` layer that computes what ``node`` (a conv/linear op) does, holding its tensors (not copies)."""
    packet, args = _packet(node), _named_args(node)
    if packet is _aten.linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    else:
        transposed = packet in _TRANSPOSED or (packet is _aten.convolution and args["transposed"])
        groups, rank = args["groups"], weight.dim() - 2
        if transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[rank - 1]
            in_channels, out_channels = weight.shape[0], weight.shape[1] * groups
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
            in_channels, out_channels = weight.shape[1] * groups, weight.shape[0]
        layer = cls(in_channels, out_channels, tuple(weight.shape[2:]), groups=groups, bias=False, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    layer.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def _batch_norm_names(nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """Each batch norm by its module's path in the exported model (with the node where that path repeats)."""
    paths = {node: _module_path(node).strip(" ,") or node.name for node in nodes}
    counts = Counter(paths.values())
    return {node: path if counts[path] == 1 else f"{path} (call {node.name})" for node, path in paths.items()}


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    return f", {path}" if path else ""


def _op_name(node: fx.Node) -> str:
    return f"aten.{node.target.overloadpacket.__name__}"


def _describe(node) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({node!r})"
    if node.op == "placeholder":
        return f"the program's input {node.target}"
    if node.op == "call_function":
        return f"{node.name} ({_op_name(node) if _packet(node) else getattr(node.target, '__name__', node.target)})"
    return f"{node.op} {node.target}"


def _owner(path: str) -> str:
    return path.rpartition(".")[0]


def _get_attr(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set_attr(module: nn.Module, path: str, value: nn.Parameter) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if hasattr(owner, name):
        delattr(owner, name)
    owner.register_parameter(name, value)


def _del_attr(module: nn.Module, path: str) -> None:
    owner_path, _, name = path.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if hasattr(owner, name):
        delattr(owner, name)


def _dynamic_shapes(module: fx.GraphModule, args: tuple, kwargs: dict):
    """``Dim.AUTO`` for each input dim that is symbolic in the program, where its inputs are plain
    positional tensors; ``None`` (every dim as in the example inputs) otherwise."""
    if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    values = [n.meta.get("val") for n in module.graph.nodes if n.op == "placeholder"]
    if len(values) != len(args) or not any(_symbolic_dims(v) for v in values):
        return None
    return tuple({d: torch.export.Dim.AUTO for d in _symbolic_dims(v)} for v in values)


def _symbolic_dims(value) -> list[int]:
    shape = getattr(value, "shape", ())
    return [d for d, size in enumerate(shape) if isinstance(size, torch.SymInt)]


def max_error(
    original: torch.export.ExportedProgram, folded: torch.export.ExportedProgram, inputs: tuple[tuple, dict]
) -> tuple[float, float]:
    """The largest difference between the two programs' outputs on ``inputs``, relative to the largest
    output magnitude, and the tolerance of the outputs' dtype (:data:`TOLERANCE`)."""
    args, kwargs = inputs
    with torch.no_grad():
        expected = _tensors(original.module()(*args, **kwargs))
        got = _tensors(folded.module()(*args, **kwargs))
    if len(expected) != len(got):
        return float("inf"), 0.0
    worst, tolerance = 0.0, 0.0
    for e, g in zip(expected, got, strict=True):
        if e.shape != g.shape or e.dtype != g.dtype:
            return float("inf"), 0.0
        if not e.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(e, g) else float("inf"))
            continue
        scale = e.detach().double().abs().max().item() if e.numel() else 0.0
        error = (g.double() - e.double()).abs().max().item() if e.numel() else 0.0
        worst = max(worst, error / max(scale, 1e-12))
        tolerance = max(tolerance, TOLERANCE.get(e.dtype, 1e-4))
    return worst, tolerance


def _tensors(outputs) -> list[torch.Tensor]:
    return [t for t in _pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
