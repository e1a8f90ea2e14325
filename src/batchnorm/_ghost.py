"""Ghost batch norm (Hoffer et al. 2017, "Train longer, generalize better"): training
statistics per *ghost batch* of ``virtual_batch_size`` samples rather than per batch,
with ``weight`` and ``bias`` shared; Keras 2's ``virtual_batch_size``.

The batch's samples are cut in order into ghosts of ``v`` samples (the last one may be
smaller); each channel of each ghost is normalized with that ghost's mean and biased
variance. The running statistics move, once per batch, toward the average over the
ghosts of their means and of their unbiased variances (each ghost counts once, as Keras
did; with equal ghosts the mean is the batch mean). Eval is unaffected.

Eagerly, wherever a backend of ours takes the tensor (at every size: torch has no ghost
kernel, and one launch beat torch's kernel per ghost on every shape measured), all ghosts
are normalized in one launch of the backend's ``forward_train_ghosts`` (the numba
backend's ghost kernels: work items over ghosts and channels), with the activation in the
kernel, behind :class:`_GhostFunction`. Where none does (other dtypes or devices, with no
backend forced), under tools that only follow torch's ops, and under ``torch.compile``,
each ghost runs torch's kernel and autograd, a contiguous slice of the batch in NCHW and
channels-last alike, and one copy joins the outputs.
"""

from __future__ import annotations

import torch

from . import _ops, _route, activations, kernels
from ._layout import as_ncl, output_memory_format, prepare, restore
from .activations import IDENTITY
from .running import update_running_stats

Tensor = torch.Tensor


def check_size(virtual_batch_size: int | None) -> None:
    if virtual_batch_size is not None and (not isinstance(virtual_batch_size, int) or virtual_batch_size < 1):
        raise ValueError(f"virtual_batch_size must be a positive integer or None, got {virtual_batch_size!r}")


def batch_norm(
    x: Tensor,
    size: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    skip_nonfinite: bool,
    nonfinite_count: Tensor | None,
    act: activations.Activation,
    residual: Tensor | None,
) -> Tensor:
    """Training: ``act(ghost_BN(x) + residual)`` (arguments as in ``functional.batch_norm``,
    already checked), on our kernels or torch's (see the module's docstring)."""
    ghosts = x.split(size)
    per_sample = x[0].numel() // x.shape[1]  # values per channel in one sample
    smallest = ghosts[-1].shape[0] * per_sample
    if smallest <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel in every ghost batch when training, got a ghost of "
            f"{smallest} (input size {tuple(x.shape)}, virtual_batch_size={size})"
        )
    fused = act if residual is None else IDENTITY  # the activation the ghost kernels apply
    after = act if residual is not None else None  # the activation still to apply
    if torch.compiler.is_compiling() or _route.runs_torch_ops(x, weight, bias, fused=True, any_size=True):
        y, mean, var = _ghosts_by_torch(x, ghosts, weight, bias, eps)
        after = act
    elif _ops.needs_autograd(x, weight, bias):
        y, mean, var, _ = _GhostFunction.apply(x, weight, bias, size, eps, fused)
    else:
        y, mean, var, _ = _forward_impl(x, weight, bias, size, eps, fused)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            update_running_from_ghosts(running_mean, running_var, mean, var, [g.shape[0] * per_sample for g in ghosts],
                                       momentum, num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    if residual is not None:
        y = y + residual
    return y if after is None else activations.forward(y, after)


def update_running_from_ghosts(running_mean, running_var, mean: Tensor, var: Tensor, counts: list[int], momentum,
                               num_batches_tracked, skip_nonfinite, nonfinite_count) -> None:  # fmt: skip
    """The running statistics' one update per batch of ghosts: toward the ghosts' average mean and
    average unbiased variance (``mean``, ``var``: ``[G, C]``, biased, over ``counts[g]`` values)."""
    n = torch.tensor(counts, dtype=var.dtype, device=var.device)[:, None]
    unbiased = (var * (n / (n - 1))).mean(0)  # each ghost's, averaged
    total = sum(counts)  # given as the biased variance of `total` values that unbiases to it
    update_running_stats(running_mean, running_var, mean.mean(0), unbiased * ((total - 1) / total), total, momentum,
                         num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip


def _ghosts_by_torch(x: Tensor, ghosts: tuple[Tensor, ...], weight, bias, eps) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, var)``: each ghost through torch's kernel and autograd, joined in one copy;
    statistics ``[G, C]`` (the biased variance from the invstd torch returns)."""
    outputs, means, invstds = [], [], []
    for ghost in ghosts:
        y, mean, invstd = torch.native_batch_norm(ghost, weight, bias, None, None, True, 0.0, eps)
        outputs.append(y)
        means.append(mean.detach())
        invstds.append(invstd.detach())
    return torch.cat(outputs), torch.stack(means), torch.stack(invstds).pow(-2) - eps


def _forward_impl(x, weight, bias, size, eps, act):
    """``(y, mean, var, invstd)`` from the backend's ghost kernels, statistics ``[G, C]``."""
    x = prepare(x)
    x3 = as_ncl(x)
    backend = kernels.select(x3, fused=True, any_size=True)
    y3, mean, var, invstd = backend.forward_train_ghosts(x3, size, weight, bias, eps, act)
    return restore(y3, x), mean, var, invstd


class _GhostFunction(torch.autograd.Function):
    """Ghost batch norm on our kernels; a differentiated backward (double backward) takes the
    gradient of ``_ops.composite_forward`` on each ghost instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, size, eps, act):
        y, mean, var, invstd = _forward_impl(x, weight, bias, size, eps, act)
        ctx.mark_non_differentiable(mean, var, invstd)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.size, ctx.eps, ctx.act = size, eps, act
        return y, mean, var, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dinvstd):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        inputs = (x, weight, bias)
        wanted = [t is not None and need for t, need in zip(inputs, ctx.needs_input_grad[:3], strict=True)]
        if torch.is_grad_enabled():
            y = torch.cat([_ops.composite_forward(g, weight, bias, ctx.eps, None, ctx.act) for g in x.split(ctx.size)])
            grads = iter(torch.autograd.grad(y, [t for t, w in zip(inputs, wanted, strict=True) if w], dy,
                                             create_graph=True))  # fmt: skip
            return (*(next(grads) if w else None for w in wanted), None, None, None)
        xp = prepare(x)
        x3, dy3 = as_ncl(xp), as_ncl(dy.contiguous(memory_format=output_memory_format(xp)))
        dx3, sum_dz, sum_dz_xmu = kernels.select(x3, fused=True, any_size=True).backward_train_ghosts(
            dy3, x3, ctx.size, mean, invstd, weight, bias, ctx.act
        )
        dweight = None if not wanted[1] else (sum_dz_xmu * invstd).sum(0).to(weight.dtype)
        dbias = None if not wanted[2] else sum_dz.sum(0).to(bias.dtype)
        return (restore(dx3, xp) if wanted[0] else None), dweight, dbias, None, None, None
