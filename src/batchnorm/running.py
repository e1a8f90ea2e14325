"""The running-statistics update: how a batch's statistics reach the population estimates.

``running = (1 - f) * running + f * batch`` with ``f = momentum`` (torch's
convention: the weight of the new batch) or, for ``momentum=None``,
``f = 1 / num_batches_tracked`` (cumulative average); the running variance takes
the unbiased batch variance. With ``skip_nonfinite`` a batch whose statistics
hold NaN/Inf leaves the buffers and ``num_batches_tracked`` alone and is counted
in ``nonfinite_count``.

Two implementations of that one rule, chosen by :func:`update_running_stats`:

* :func:`update_on_device`: tensor ops only, nothing read back to the host (on
  accelerators, while compiling or tracing; TorchScript compiles it too);
* :func:`_update_on_cpu`: for CPU buffers in eager mode, decided and computed in
  one Numba call on NumPy views of the buffers (at small sizes a dozen torch
  calls of a few microseconds each cost more than the normalization itself).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .numerics import unbiased

Tensor = torch.Tensor

__all__ = ["recomputing", "update_from_invstd", "update_on_device", "update_running_stats"]

_NUMPY_DTYPES = (torch.float32, torch.float64)
_EMPTY = np.empty(0)


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None = None,
    skip_nonfinite: bool = True,
    nonfinite_count: Tensor | None = None,
) -> None:
    """Fold one batch's ``mean`` and biased ``var`` (over ``count`` values per channel) into
    the running estimates, in place; see the module docstring for the rule."""
    if _compiled_on_cpu(mean):
        _update_on_cpu(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                       skip_nonfinite, nonfinite_count)  # fmt: skip
        return
    update_on_device(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                     skip_nonfinite, nonfinite_count)  # fmt: skip


def update_from_invstd(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    skip_nonfinite: bool,
    nonfinite_count: Tensor | None,
) -> None:
    """:func:`update_running_stats` from ``invstd = 1 / sqrt(var + eps)`` (what torch's
    ``native_batch_norm`` returns) instead of ``var``; on the CPU the variance is recovered
    inside the one compiled call."""
    if _compiled_on_cpu(mean):
        _update_on_cpu(running_mean, running_var, mean, invstd, count, momentum, num_batches_tracked,
                       skip_nonfinite, nonfinite_count, eps)  # fmt: skip
        return
    var = invstd.detach().pow(-2) - eps
    update_on_device(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                     skip_nonfinite, nonfinite_count)  # fmt: skip


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing's
    recomputation (``torch.utils.checkpoint``, reentrant or not). The real forward has
    updated the running statistics already, so a training call here leaves them alone
    (torch's layers update them twice, pytorch#96136). Eager only: under ``torch.compile``
    the recomputation belongs to the compiled backward."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _compiled_on_cpu(mean: Tensor) -> bool:
    """Whether the update runs as the one compiled CPU call (CPU statistics, eagerly: not while
    compiling or tracing, where only tensor ops are recorded)."""
    return mean.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def update_on_device(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    skip_nonfinite: bool,
    nonfinite_count: Tensor | None,
) -> None:
    """The update with tensor ops only: the skip decision stays a 0-d tensor on the device."""
    with torch.no_grad():
        mean = mean.detach()
        var = var.detach()
        batch_var = unbiased(var, count)
        dtype = mean.dtype
        if running_mean is not None:
            dtype = running_mean.dtype
        elif running_var is not None:
            dtype = running_var.dtype
        mean, batch_var = mean.to(dtype), batch_var.to(dtype)
        on = torch.ones((), dtype=dtype, device=mean.device)
        if skip_nonfinite:
            finite = torch.isfinite(mean).all() & torch.isfinite(batch_var).all()  # 0-d, stays on the device
            if nonfinite_count is not None:
                nonfinite_count.add_((~finite).to(nonfinite_count.dtype))
            # a skipped batch gets weight 0 below; zeroed first so that NaN * 0 cannot leak in
            mean, batch_var = mean.nan_to_num(0.0, 0.0, 0.0), batch_var.nan_to_num(0.0, 0.0, 0.0)
            on = finite.to(dtype)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
        elif num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            if num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
            weight = on / num_batches_tracked.clamp(min=1).to(dtype)
        else:
            weight = on * momentum
        # running += weight * (batch - running)
        if running_mean is not None:
            running_mean.add_(weight * (mean - running_mean))
        if running_var is not None:
            running_var.add_(weight * (batch_var - running_var))


def _update_on_cpu(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                   skip_nonfinite, nonfinite_count, eps=-1.0) -> None:  # fmt: skip
    """The update for CPU tensors, in one compiled call on the ``C``-sized NumPy views; with
    ``eps >= 0``, ``var`` holds ``1 / sqrt(var + eps)`` instead."""
    if not _numpy_dtypes(running_mean, running_var, mean, var):
        # dtypes NumPy lacks (bfloat16/float16 buffers): the same rule in torch ops
        if eps >= 0:
            var = var.detach().pow(-2) - eps
        update_on_device(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                         skip_nonfinite, nonfinite_count)  # fmt: skip
        return
    if momentum is not None:
        factor = momentum
    elif num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    else:  # the cumulative average's weight, counting this batch
        factor = 1.0 / max(int(num_batches_tracked) + 1, 1)
    var_factor = factor * unbiased(1.0, count)  # the weight of the biased variance, made unbiased
    rm = _EMPTY if running_mean is None else _numpy(running_mean)
    rv = _EMPTY if running_var is None else _numpy(running_var)
    updated = running_update(rm, rv, _numpy(mean), _numpy(var), factor, var_factor, skip_nonfinite, eps)
    # the counters (integer tensors, never requiring grad): torch's own in-place add, which bumps their version
    if not updated:
        if nonfinite_count is not None:
            nonfinite_count.add_(1)
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    for running in (running_mean, running_var):
        if running is not None:
            torch.autograd.graph.increment_version(running)  # written behind torch's back: say so


def _numpy_dtypes(running_mean, running_var, mean, var) -> bool:
    """Whether the float tensors all have a NumPy dtype (the counters are int64 tensors of torch's)."""
    return (
        mean.dtype in _NUMPY_DTYPES
        and var.dtype in _NUMPY_DTYPES
        and (running_mean is None or running_mean.dtype in _NUMPY_DTYPES)
        and (running_var is None or running_var.dtype in _NUMPY_DTYPES)
    )


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().numpy() if t.requires_grad else t.numpy()


@numba.njit(cache=True, nogil=True, error_model="numpy")  # 1 / 0 is inf (a skipped batch), not an error
def running_update(running_mean, running_var, mean, var, factor, var_factor, skip_nonfinite, eps=-1.0):
    """``running = (1 - factor) * running + scale * batch`` for both buffers (``scale`` is
    ``factor`` for the mean, ``var_factor`` for the variance), unless ``skip_nonfinite`` and a
    statistic is NaN/Inf; returns whether the buffers were updated. Either buffer may be empty.
    With ``eps >= 0``, ``var`` holds ``invstd = 1 / sqrt(var + eps)``: the variance is
    ``1 / invstd^2 - eps`` (in float64)."""
    C = mean.shape[0]
    batch_var = np.empty(C)
    for c in range(C):
        if eps >= 0:
            s = np.float64(var[c])
            batch_var[c] = 1.0 / (s * s) - eps
        else:
            batch_var[c] = var[c]
    if skip_nonfinite:
        for c in range(C):
            if not (np.isfinite(mean[c]) and np.isfinite(batch_var[c])):
                return False
    keep = 1.0 - factor
    for c in range(running_mean.shape[0]):
        running_mean[c] = keep * running_mean[c] + factor * mean[c]
    for c in range(running_var.shape[0]):
        running_var[c] = keep * running_var[c] + var_factor * batch_var[c]
    return True
