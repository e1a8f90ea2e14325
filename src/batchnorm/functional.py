"""``batch_norm`` for torch tensors: validate, pick a path, update the running statistics.

The paths (``_route`` decides between torch's ops and ours):

* **torch's ops** (``_torch_ops``): under tools that only follow torch's ops
  (tracing, export, forward-mode AD, ``torch.func``), and where the registry's
  automatic choice is torch's own kernel; our semantics stay around it;
* **memory-saving training** (``_memory_efficient``): keeps only the output;
* **eval in place under autograd**: torch's in-place multiply-add;
* **eval**: one multiply-add per element through our kernels (``_ops.affine``);
* **training**: our fused kernels (``_ops.forward_train``), then the running
  update (``running``), which a checkpointed forward's recomputation skips;
* **masked** (``mask=``): statistics over the valid positions (``_masked``);
* **ghost batches** (``virtual_batch_size``): statistics per ghost batch (``_ghost``).

A residual that does not match the input's shape and dtype (a broadcast, a
type promotion) is added after the normalization as a torch op.
"""

from __future__ import annotations

import warnings

import torch

from . import _ghost, _masked, _memory_efficient, _ops, _route, _torch_ops, activations
from ._checks import check_input, check_residual
from ._layout import per_channel
from ._ops import composite_forward  # noqa: F401  (kept importable from here)
from .activations import Activation
from .numerics import affine_from_stats, invstd_of, stats_dtype
from .running import recomputing, update_running_stats

Tensor = torch.Tensor

__all__ = ["affine", "batch_norm", "inference_affine", "update_running_stats"]


def inference_affine(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """The eval-mode layer as one per-channel multiply-add: ``y = x * scale + shift``.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``,
    computed in at least float32 and differentiable in ``weight`` and ``bias``.
    """
    sdtype = stats_dtype(running_var.dtype)
    if running_var.dtype != sdtype:
        running_mean, running_var = running_mean.to(sdtype), running_var.to(sdtype)
    return affine_from_stats(running_mean, invstd_of(running_var, eps), weight, bias)


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x * scale[c] + shift[c]`` per channel (dim 1): a frozen batch norm; differentiable,
    and taking the same path as :func:`batch_norm` (our kernel, or torch's ops where those run)."""
    if _route.runs_torch_ops(x, None, None, fused=False, training=False):
        return _torch_ops.affine(x, scale, shift)
    return _ops.affine(x, scale, shift)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    skip_nonfinite: bool = True,
    nonfinite_count: Tensor | None = None,
    activation: str | tuple[str, float] | torch.nn.Module | Activation | None = None,
    residual: Tensor | None = None,
    memory_efficient: bool = False,
    inplace: bool = False,
    mask: Tensor | None = None,
    virtual_batch_size: int | None = None,
) -> Tensor:
    """Batch normalization with :func:`torch.nn.functional.batch_norm`'s signature.

    Training (``training=True``) normalizes with the batch's mean and biased
    variance over every dimension but ``C`` and, when running buffers are
    given, updates them in place (see :func:`update_running_stats`). Eval uses
    the running buffers, folded into one multiply-add per element.

    Keyword-only extras beyond torch: ``num_batches_tracked`` (incremented per
    batch; required for ``momentum=None``), ``skip_nonfinite`` (default True:
    a NaN/Inf batch does not reach the running statistics) and
    ``nonfinite_count`` (counts the batches skipped so).

    Fusion: the result is ``activation(BN(input) + residual)``; ``activation``
    is ``None``/``"identity"``, ``"relu"``, ``"leaky_relu"`` (or
    ``("leaky_relu", slope)``), ``"elu"`` (or ``("elu", alpha)``), ``"silu"``,
    or the matching ``torch.nn`` module. The backward applies the activation's
    derivative itself, keeping the input alone (plus a 1-bit sign mask for
    ReLU/LeakyReLU after a residual add) instead of the input and the output.
    ``memory_efficient=True`` (training, invertible activations, no residual)
    keeps only the output and recomputes the rest from it. ``inplace=True``
    writes the output over ``input`` and returns it (in training with autograd,
    through the memory-saving backward).

    ``mask`` (boolean, the input's shape without dim 1, ``True`` where a value is real):
    statistics over the valid positions only, 0 at the others (``batchnorm._masked``).
    ``virtual_batch_size``: in training, statistics per ghost batch of that many samples
    (``batchnorm._ghost``).
    """
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            skip_nonfinite, nonfinite_count, activation, residual, memory_efficient, inplace, mask,
            virtual_batch_size)  # fmt: skip
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            # our checks read sizes, which a trace records as constants (as it does torch's layer's)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _batch_norm(*args)
    return _batch_norm(*args)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                skip_nonfinite, nonfinite_count, activation, residual, memory_efficient,
                inplace, mask=None, virtual_batch_size=None) -> Tensor:  # fmt: skip
    check_input(input, running_mean, running_var, weight, bias, training, eps)
    if training and recomputing():  # a checkpointed forward again: the statistics are counted already
        running_mean = running_var = num_batches_tracked = nonfinite_count = None
    act = activations.parse(activation)
    check_residual(input, residual)
    _ghost.check_size(virtual_batch_size)
    ghosts = virtual_batch_size is not None and training and input.shape[0] > virtual_batch_size
    if ghosts:
        if mask is not None or memory_efficient or inplace:
            raise ValueError("virtual_batch_size does not combine with mask=, memory_efficient=True or inplace=True")
        return _ghost.batch_norm(input, virtual_batch_size, running_mean, running_var, weight, bias, momentum, eps,
                                 num_batches_tracked, skip_nonfinite, nonfinite_count, act, residual)  # fmt: skip
    if mask is not None:
        if memory_efficient or inplace:
            raise ValueError("mask= does not combine with memory_efficient=True or inplace=True")
        return _masked.batch_norm(input, mask, running_mean, running_var, weight, bias, training, momentum, eps,
                                  num_batches_tracked, skip_nonfinite, nonfinite_count, act, residual)  # fmt: skip
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
        y = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                        skip_nonfinite, nonfinite_count, None, None, memory_efficient, False)  # fmt: skip
        return activations.forward(y + residual, act)
    grad_needed = _ops.needs_autograd(input, weight, bias, residual)
    # training that keeps only the output: asked for, or the only way to overwrite an input autograd needs
    keeps_output = training and (memory_efficient or (inplace and grad_needed))
    if keeps_output:
        _memory_efficient.check(act, weight, residual, "memory_efficient=True" if memory_efficient else
                                "inplace=True in training")  # fmt: skip
    updates = training and (running_mean is not None or running_var is not None)
    if inplace and grad_needed and not training and input.numel() > 0:
        return _eval_in_place(input, running_mean, running_var, weight, bias, eps, act, residual)
    fused = residual is not None or act != activations.IDENTITY
    if _route.runs_torch_ops(input, weight, bias, fused, memory_saving=keeps_output, training=training):
        if updates and _route.in_functorch_transform():
            return _in_transform_updating(
                input, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, act, residual
            )
        y = _torch_ops.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            skip_nonfinite, nonfinite_count, act.name, act.param, residual,
        )  # fmt: skip
        return input.copy_(y) if inplace else y
    if not training:
        scale, shift = inference_affine(running_mean, running_var, weight, bias, eps)
        if torch.compiler.is_compiling() or _ops.needs_autograd(input, scale, shift, residual):
            y = _torch_ops.activate(_ops.affine(input, scale, shift), residual, act.name, act.param, False)
        else:  # one pass: the multiply-add, the residual and the activation in the kernel
            y = _ops.apply_act(input, scale, shift, residual, act)
        return input.copy_(y) if inplace else y
    if keeps_output:  # with inplace, the output is written over the input
        y, mean, var = _memory_efficient.MemoryEfficientBatchNorm.apply(input, weight, bias, eps, act, inplace)
    else:
        y, mean, var, _, _ = _ops.forward_train(input, weight, bias, eps, residual, act)
        y = input.copy_(y) if inplace else y
    if updates:
        update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum,
                             num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    return y


def _eval_in_place(input, running_mean, running_var, weight, bias, eps, act, residual) -> Tensor:
    """Eval over the input while autograd records: torch's in-place multiply-add (autograd keeps
    what their backward needs), the residual add and the activation in place after it."""
    scale, shift = inference_affine(running_mean, running_var, weight, bias, eps)
    y = input.mul_(per_channel(scale, input)).add_(per_channel(shift, input))
    if residual is not None:
        y.add_(residual)
    return activations.apply_(y, act)


torch.fx.wrap("batch_norm")  # symbolic tracing records a call, rather than tracing into the checks


_TRANSFORM_ADVICE = (
    "batch norm in training mode updates its running statistics in place, which a torch.func transform "
    "cannot do with the buffers it captured: call torch.func.replace_all_batch_norm_modules_(model) first "
    "(it stops tracking running statistics), pass the buffers to functional_call too, build the layers with "
    "track_running_stats=False, or run the model in eval mode"
)


def _in_transform_updating(input, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked,
                           act, residual) -> Tensor:  # fmt: skip
    """Training inside a torch.func transform with running buffers: torch's kernel writes them
    (a transform's wrapped values cannot reach our update; a non-finite batch is not skipped here).
    Where torch itself refuses (vmap over the batch, buffers captured by grad), say what to do."""
    if torch._C._functorch.is_batchedtensor(input):
        raise RuntimeError(_TRANSFORM_ADVICE)
    try:
        return _torch_ops.batch_norm(
            input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked,
            False, None, act.name, act.param, residual,
        )  # fmt: skip
    except RuntimeError as error:
        if "captured Tensor" in str(error) or "batched" in str(error):
            raise RuntimeError(_TRANSFORM_ADVICE) from error
        raise
