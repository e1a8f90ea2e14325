"""Which path a batch-norm call takes: our kernels, or torch's own ops around our semantics.

Our kernels run behind ``torch.library`` custom ops (under ``torch.compile``)
or an ``autograd.Function`` (eager). Some tools cannot see through either, and
would silently record nothing or fail; for them the call goes to torch's own
ops (``_torch_ops``), which every tool understands. That choice is made here,
and only here:

* :func:`tool_needs_torch_ops`: a tracer, ``torch.export``, forward-mode AD or
  a ``torch.func`` transform is active (whatever backend is forced);
* :func:`prefers_torch_kernel`: with no backend forced, where torch's kernel is
  the better choice: small eager CPU calls (measured crossover, ``SMALL_NUMEL``)
  and every non-CPU device (our GPU kernels are opt-in until they have passed
  the GPU check on real hardware: ``batchnorm.backend("triton")``, eager only;
  under ``torch.compile`` a GPU layer is torch's ops, which inductor fuses).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad

from . import kernels

Tensor = torch.Tensor

# Up to this many elements a CPU float32/float64 call goes to torch's own batch-norm
# kernel (with its C++ autograd), then torch's add and activation when fused. Measured on
# 2 cores (training forward+backward, both layouts): at 256K elements that path took
# 0.65-0.8x the time of our kernels behind our Python layer; at 1M elements 1.0-1.4x.
SMALL_NUMEL = 1 << 18


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


def prefers_torch_kernel(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether, with no backend forced, torch's own kernel should run this call."""
    if x.device.type != "cpu":
        return torch.compiler.is_compiling() or kernels.forced_name() is None
    if torch.compiler.is_compiling() or kernels.forced_name() is not None:
        return False  # compiled: our custom ops, one graph node each
    return (
        x.numel() <= SMALL_NUMEL
        and x.dtype in (torch.float32, torch.float64)
        and (weight is None or weight.dtype == x.dtype)
        and (bias is None or bias.dtype == x.dtype)
    )
