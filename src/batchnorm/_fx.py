"""torch.fx tracing that keeps batch-norm layers whole.

torch.fx treats ``torch.nn`` modules as leaves but traces into everything else,
and our layers' forward (input checks, backend dispatch) cannot be traced
symbolically; so ``fuse`` and ``fold`` trace with this tracer, which records
every batch-norm-like layer of this package as one ``call_module`` node.
"""

from __future__ import annotations

from torch import fx, nn

# where this package's layers are defined (not its example networks: those are traced into)
_LAYER_MODULES = ("batchnorm.modules", "batchnorm.sync", "batchnorm.fold")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__module__ in _LAYER_MODULES:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace`` with this package's layers as leaves; raises if the model cannot be traced."""
    graph = _Tracer().trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(model, graph, name)


def call_counts(traced: fx.GraphModule) -> dict[str, int]:
    """How many ``call_module`` nodes call each submodule (a layer called twice cannot be rewritten)."""
    counts: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts
