"""Which path a batch-norm call takes: our kernels, or torch's own ops around our semantics.

Our kernels run behind ``torch.library`` custom ops (under ``torch.compile``)
or an ``autograd.Function`` (eager). Some tools cannot see through either, and
would silently record nothing or fail; for them the call goes to torch's own
ops (``_torch_ops``), which every tool understands. :func:`runs_torch_ops`
decides, and is the only place that does:

* :func:`tool_needs_torch_ops`: a tracer, ``torch.export``, forward-mode AD or
  a ``torch.func`` transform is active (whatever backend is forced);
* otherwise, with no backend forced, when the registry's automatic choice for
  the tensor is ``torch`` (``kernels.select``: every backend declined it, e.g.
  the numba backend below its measured size threshold, or a CUDA tensor, as our
  GPU kernels are opt-in), torch's own kernel and autograd run the call, which
  is faster than torch's stages behind our layer; under ``torch.compile`` on the
  CPU our ops stay (one graph node each), on a GPU torch's ops, which inductor fuses.

Which backend runs inside our ops is the registry's choice alone (``kernels``).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad

from . import kernels
from ._layout import as_ncl

Tensor = torch.Tensor
_NATIVE = (torch.float32, torch.float64)


def in_functorch_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...) is active."""
    return torch._C._functorch.maybe_current_level() is not None


def tool_needs_torch_ops() -> bool:
    """Whether an active tool can only follow torch's own ops (our kernels would be invisible
    to it, or it cannot differentiate through them)."""
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_exporting()
        or forward_ad._current_level >= 0
        or in_functorch_transform()
    )


def runs_torch_ops(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    fused: bool,
    memory_saving: bool = False,
    training: bool = True,
    any_size: bool = False,
) -> bool:
    """Whether this call runs torch's own ops (``_torch_ops``) rather than our kernels
    (``fused``: with an activation or residual; ``memory_saving``: only our path offers it,
    so only tools and empty batches send it to torch's ops; ``training``: else an eval call,
    normalized with running statistics; ``any_size``: the backends' size rule left out, see
    ``kernels.select``)."""
    if x.numel() == 0 or tool_needs_torch_ops():
        return True
    if memory_saving:
        return False
    if not x.is_cpu:  # our GPU kernels are opt-in, and eager only
        return torch.compiler.is_compiling() or kernels.forced_name() is None
    if torch.compiler.is_compiling() or kernels.forced_name() is not None:
        return False
    # torch's kernel keeps float32/float64 statistics only with parameters of the input's dtype
    if x.dtype not in _NATIVE or (weight is not None and weight.dtype != x.dtype):
        return False
    if bias is not None and bias.dtype != x.dtype:
        return False
    return kernels.automatic(as_ncl(x), fused, training, any_size).name == "torch"
