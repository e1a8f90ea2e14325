"""torch.fx tracing that keeps batch-norm layers whole.

torch.fx treats ``torch.nn`` modules as leaves but traces into everything else,
and our layers' forward (input checks, backend dispatch) cannot be traced
symbolically. So our layers record themselves as one ``call_module`` node
under any tracer (:func:`record_call`), as torch's do; and ``fuse`` and
``fold`` trace with a tracer that also keeps every subclass of torch's batch
norm whole (timm's, detectron2's), whose buffers a trace into them would drop.
"""

from __future__ import annotations

import warnings

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

# where this package's layers are defined (not its example networks: those are traced into)
_LAYER_MODULES = ("batchnorm.modules", "batchnorm.sync", "batchnorm.fold")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__module__ in _LAYER_MODULES or isinstance(m, _BatchNorm):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace`` with this package's layers as leaves; raises if the model cannot be traced."""
    graph = _Tracer().trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(model, graph, name)


# what symbolic tracing raises on Python it cannot follow (data-dependent control flow, len() of
# a proxy, calls that need real values); anything else is a bug and propagates
UNTRACEABLE = (fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, AttributeError, ValueError)


def trace_or_warn(model: nn.Module, caller: str, instead: str) -> fx.GraphModule | None:
    """:func:`trace`, or ``None`` with a warning that says why and what ``caller`` does ``instead``."""
    try:
        return trace(model)
    except UNTRACEABLE as error:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"batchnorm.{caller}: torch.fx cannot trace {type(model).__name__}.forward ({reason}); {instead}",
            stacklevel=3,
        )
        return None


def record_call(module: nn.Module, input: fx.Proxy, residual: fx.Proxy | None = None, mask=None) -> fx.Proxy:
    """Under any symbolic tracer, record ``module`` as one ``call_module`` node, as tracers do
    for torch's own layers: its forward (checks, backend dispatch) is not traced into, and the
    traced model keeps the layer whole (its buffers and ``state_dict`` keys included)."""
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:  # the traced root itself: there is no parent to call it from
        raise fx.proxy.TraceError(
            f"symbolic tracing traces into the module it is given, and a batch-norm layer ({type(module).__name__}, "
            "like torch's) cannot be traced into; trace the model that contains it"
        )
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", path, args, {} if mask is None else {"mask": mask})


def call_counts(traced: fx.GraphModule) -> dict[str, int]:
    """How many ``call_module`` nodes call each submodule (a layer called twice cannot be rewritten)."""
    counts: dict[str, int] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts
