"""Rewriting an existing model so its batch norms fuse what follows them.

``BatchNorm -> activation`` and ``BatchNorm -> add -> activation`` become one
of our layers with ``activation=`` (and the add's other operand passed as the
residual), which saves a pass and the memory of one tensor per pattern. torch.fx
does the rewrite where the model traces; where it does not, a walk over
``nn.Sequential`` containers fuses adjacent ``BatchNorm, activation`` pairs.
Anything that is not provably safe (the batch norm's output used twice, a
batch-norm module called from two places, an unknown activation) is left alone.
"""

from __future__ import annotations

import copy
import itertools
import operator

import torch
from torch import fx, nn

from . import activations
from ._fx import call_counts, trace_or_warn
from .activations import Activation
from .convert import convert, convert_norm_act_layers
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["fuse"]

# torch's layers and ours, exactly (a subclass may compute something else: timm's applies its own activation)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNorm1d, BatchNorm2d, BatchNorm3d)
_ADDS = {operator.add, operator.iadd, torch.add}
_FUNCTIONS = {
    torch.relu: "relu",
    torch.relu_: "relu",
    nn.functional.relu: "relu",
    nn.functional.leaky_relu: "leaky_relu",
    nn.functional.elu: "elu",
    nn.functional.silu: "silu",
}
_METHODS = {"relu": "relu", "relu_": "relu"}


def fuse(model: nn.Module, memory_efficient: bool = False) -> nn.Module:
    """A new model: ``model`` with its batch-norm + activation (+ residual add) patterns fused.

    Like torch.fx passes and torch's ``fuse_modules``, it leaves the model you pass
    untouched and returns a new one (an ``fx.GraphModule`` where torch.fx can
    trace the model, else a copy with its ``nn.Sequential`` pairs fused); build
    the optimizer on the returned model. Its ``state_dict`` keys are the
    original's, so a checkpoint of either loads into the other.

    ``memory_efficient=True`` also puts the fused layers with an invertible
    activation (identity, LeakyReLU, ELU) and no residual in the memory-saving
    mode: in training they keep only their output, which the next layer usually
    keeps anyway, so their input is freed after the forward. Their weights must
    stay non-zero (the layer raises otherwise). Layers fused before (by an earlier
    ``fuse``, or built with ``activation=``) join the mode too.
    """
    model = copy.deepcopy(model)
    convert_norm_act_layers(model)
    traced = trace_or_warn(model, "fuse", "fusing the pairs inside nn.Sequential containers only")
    if traced is None:
        return _fuse_sequentials(model, memory_efficient)
    if traced.state_dict().keys() != model.state_dict().keys():  # the trace would lose or rename state
        return _fuse_sequentials(model, memory_efficient)
    _fuse_graph(traced, memory_efficient)
    return traced


# --- torch.fx ---------------------------------------------------------------------------


def _activation_of(node: fx.Node, modules: dict[str, nn.Module], source: fx.Node) -> Activation | None:
    """The activation ``node`` applies to ``source``, if it is one we can fuse."""
    if node.op == "call_module":
        module = modules[node.target]
        try:
            act = activations.parse(module)
        except ValueError:
            return None
        return act if node.args[:1] == (source,) and len(node.args) == 1 and not node.kwargs else None
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        return Activation(_METHODS[node.target])
    if node.op != "call_function" or node.target not in _FUNCTIONS:
        return None
    name = _FUNCTIONS[node.target]
    extra = list(node.args[1:])
    kwargs = dict(node.kwargs)
    kwargs.pop("inplace", None)
    if name == "relu" or name == "silu":
        return Activation(name) if len(extra) <= 1 and not kwargs else None
    key = "negative_slope" if name == "leaky_relu" else "alpha"
    value = extra[0] if extra else kwargs.pop(key, None)
    if kwargs or len(extra) > 2 or isinstance(value, fx.Node):
        return None
    return activations.parse(name if value is None else (name, float(value)))


def _fusable_bn(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> bool:
    if node.op != "call_module" or type(modules[node.target]) not in _BN_TYPES:
        return False
    module = modules[node.target]
    if getattr(module, "activation", activations.IDENTITY) != activations.IDENTITY:
        return False
    if getattr(module, "memory_efficient", False):
        return False
    return calls[node.target] == 1 and len(node.users) == 1 and len(node.args) == 1 and not node.kwargs


def _fuse_graph(traced: fx.GraphModule, memory_efficient: bool = False) -> None:
    modules = dict(traced.named_modules())
    calls = call_counts(traced)
    for node in list(traced.graph.nodes):
        if not _fusable_bn(node, modules, calls):
            continue
        (user,) = node.users
        residual, last = None, user
        act = _activation_of(user, modules, node)
        if act is None and _is_add_of(user, node):
            residual = user.args[1] if user.args[0] is node else user.args[0]
            if len(user.users) == 1:
                (last,) = user.users
                act = _activation_of(last, modules, user)
        if act is None:
            continue
        _replace_module(traced, node.target, act, memory_efficient and residual is None)
        with traced.graph.inserting_before(last):
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            fused = traced.graph.call_module(node.target, args)
        last.replace_all_uses_with(fused)
        for dead in (last, user, node) if residual is not None else (last, node):
            traced.graph.erase_node(dead)
    if memory_efficient:  # layers fused before (an earlier fuse, or built so) join the memory-saving mode
        for node in traced.graph.nodes:
            if node.op == "call_module" and calls.get(node.target) == 1 and len(node.args) == 1 and not node.kwargs:
                _save_memory(modules[node.target])
    traced.graph.lint()
    traced.recompile()


def _save_memory(module: nn.Module) -> None:
    """Put one of our fused layers (an invertible activation, called without a residual) in the
    memory-saving mode."""
    if type(module) in (BatchNorm1d, BatchNorm2d, BatchNorm3d) and module.activation != activations.IDENTITY:
        module.memory_efficient = module.memory_efficient or module.activation.invertible


def _is_add_of(node: fx.Node, source: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _ADDS or node.kwargs or len(node.args) != 2:
        return False
    other = node.args[1] if node.args[0] is source else node.args[0]
    return source in node.args and isinstance(other, fx.Node) and other is not source


def _replace_module(root: nn.Module, target: str, act: Activation, memory_efficient: bool = False) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    fused = convert(getattr(parent, name))  # ours, sharing the same tensors (a no-op if already ours)
    fused.activation = act
    fused.memory_efficient = memory_efficient and act.invertible
    setattr(parent, name, fused)


# --- module walk ----------------------------------------------------------------------------


def _fuse_sequentials(module: nn.Module, memory_efficient: bool = False) -> nn.Module:
    for name, child in module.named_children():
        setattr(module, name, _fuse_sequentials(child, memory_efficient))
    if not isinstance(module, nn.Sequential):
        return module
    children = list(module.named_children())
    if memory_efficient:
        for _, child in children:
            _save_memory(child)
    for (bn_name, bn), (act_name, act_module) in itertools.pairwise(children):
        if type(bn) not in _BN_TYPES or getattr(bn, "activation", activations.IDENTITY) != activations.IDENTITY:
            continue
        try:
            act = activations.parse(act_module)
        except ValueError:
            continue
        _replace_module(module, bn_name, act, memory_efficient)
        setattr(module, act_name, nn.Identity())
    return module
