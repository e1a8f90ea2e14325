"""``batch_norm`` for torch tensors: validation, backend dispatch, autograd and
the running-statistics update.

The heavy work runs in ``torch.library`` custom ops, so ``torch.compile`` and
``torch.export`` see one node each and never break the graph:

* ``batchnorm::forward_train(x, weight, bias, eps, residual, activation, act_param)
  -> (y, mean, var, mask)``: ``y = act(BN(x) + residual)``; ``mask`` is the bit
  mask of ``BN(x) + residual > 0`` (``kernels.sign_mask``) for ReLU/LeakyReLU
  after a residual, else empty
* ``batchnorm::backward_train(dy, x, mean, invstd, weight, bias, activation, act_param)
  -> (dx, sum_dz, sum_dz_xmu)``, the activation's derivative recomputed from x
* ``batchnorm::backward_train_residual(dy, x, mean, invstd, weight, mask, activation,
  act_param) -> (dx, dresidual, sum_dz, sum_dz_xmu)``, from the mask
* ``batchnorm::affine(x, scale, shift) -> y`` (eval: one multiply-add) and its
  reduction ``batchnorm::affine_backward(dy, x) -> (sum_dy, sum_dy_x)``

Running statistics are updated outside the ops with plain tensor operations on
the ``C``-sized buffers, without reading anything back to the host.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _cpu_update, _memory_efficient, _route, _torch_ops, activations, kernels
from ._checks import ShapeError, check_input
from ._layout import as_ncl, output_memory_format, per_channel, prepare, reduce_dims, restore
from .activations import Activation
from .kernels import sign_mask, stats_dtype
from .kernels.base import affine_from_stats

Tensor = torch.Tensor

__all__ = ["affine", "batch_norm", "inference_affine", "update_running_stats"]


# ---------------------------------------------------------------------------
# implementations (plain functions; the ops below and the eager path share them)


def _keeps_mask(residual: Tensor | None, activation: str) -> bool:
    """With a residual, ReLU/LeakyReLU's derivative comes from a saved sign mask
    (1 bit per element, ``kernels.sign_mask``) instead of the residual or the output."""
    return residual is not None and activation in ("relu", "leaky_relu")


def _no_mask(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.uint8)


def _forward_train_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    activation: str = "identity",
    act_param: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``act(BN(x) + residual)``; returns ``(y, mean, var, mask)``, ``mask`` empty unless kept."""
    x = prepare(x)
    x3 = as_ncl(x)
    backend = kernels.select(x3, fused=residual is not None or activation != "identity")
    act = Activation(activation, act_param)
    if residual is None and activation != "identity":  # the backend fuses the activation
        y3, mean, var = backend.forward_train_act(x3, weight, bias, eps, act)
        return restore(y3, x), mean, var, _no_mask(x)
    if residual is not None and (activation == "identity" or _keeps_mask(residual, activation)):
        r3 = as_ncl(residual.contiguous(memory_format=output_memory_format(x)))
        y3, mean, var, mask = backend.forward_train_residual(x3, weight, bias, eps, r3, act)
        return restore(y3, x), mean, var, (_no_mask(x) if mask is None else mask)
    y3, mean, var = backend.forward_train(x3, weight, bias, eps)
    y = restore(y3, x)
    if residual is not None:
        y.add_(residual)
    if activation != "identity":
        activations.apply_(y, act)
    return y, mean, var, _no_mask(x)


def _backward_train_impl(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None = None,
    activation: str = "identity",
    act_param: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, sum_dz, sum_dz_xmu)`` for ``y = act(BN(x))``, ``dz = dy * act'(BN(x))``."""
    x = prepare(x)
    dy = dy.contiguous(memory_format=output_memory_format(x))
    x3, dy3 = as_ncl(x), as_ncl(dy)
    backend = kernels.select(x3, fused=activation != "identity")
    if activation == "identity":
        dx3, sum_dy, sum_dy_xmu = backend.backward_train(dy3, x3, mean, invstd, weight)
    else:
        act = Activation(activation, act_param)
        dx3, sum_dy, sum_dy_xmu = backend.backward_train_act(dy3, x3, mean, invstd, weight, bias, act)
    return restore(dx3, x), sum_dy, sum_dy_xmu


def _backward_train_residual_impl(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    mask: Tensor,
    activation: str,
    act_param: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dresidual, sum_dz, sum_dz_xmu)`` for ``y = act(BN(x) + residual)`` (ReLU or
    LeakyReLU), ``dz = dy * act'`` read from the forward's sign mask."""
    x = prepare(x)
    dy = dy.contiguous(memory_format=output_memory_format(x))
    x3, dy3 = as_ncl(x), as_ncl(dy)
    backend = kernels.select(x3, fused=True)
    act = Activation(activation, act_param)
    dx3, dz3, sum_dz, sum_dz_xmu = backend.backward_train_residual(dy3, x3, mean, invstd, weight, mask, act)
    return restore(dx3, x), restore(dz3, x), sum_dz, sum_dz_xmu


def _affine_impl(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    x = prepare(x)
    x3 = as_ncl(x)
    return restore(kernels.select(x3).apply(x3, scale, shift), x)


def _affine_backward_impl(dy: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    x = prepare(x)
    dy = dy.contiguous(memory_format=output_memory_format(x))
    x3, dy3 = as_ncl(x), as_ncl(dy)
    zero = x3.new_zeros((x3.shape[1],), dtype=stats_dtype(x3.dtype))
    return kernels.select(x3).backward_reduce(dy3, x3, zero)


# ---------------------------------------------------------------------------
# the torch.library ops: what torch.compile and torch.export see


_forward_train_op = torch.library.custom_op("batchnorm::forward_train", _forward_train_impl, mutates_args=())
_backward_train_op = torch.library.custom_op("batchnorm::backward_train", _backward_train_impl, mutates_args=())
_backward_train_residual_op = torch.library.custom_op(
    "batchnorm::backward_train_residual", _backward_train_residual_impl, mutates_args=()
)
_affine_op = torch.library.custom_op("batchnorm::affine", _affine_impl, mutates_args=())
_affine_backward_op = torch.library.custom_op("batchnorm::affine_backward", _affine_backward_impl, mutates_args=())


@_forward_train_op.register_fake
def _(x, weight, bias, eps, residual=None, activation="identity", act_param=0.0):
    stats = x.new_empty((x.shape[1],), dtype=stats_dtype(x.dtype))
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    mask = sign_mask.empty(as_ncl(prepare(x))) if _keeps_mask(residual, activation) else _no_mask(x)
    return y, stats, torch.empty_like(stats), mask


@_backward_train_op.register_fake
def _(dy, x, mean, invstd, weight, bias=None, activation="identity", act_param=0.0):
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    return dx, torch.empty_like(mean), torch.empty_like(mean)


@_backward_train_residual_op.register_fake
def _(dy, x, mean, invstd, weight, mask, activation, act_param):
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    return dx, torch.empty_like(dx), torch.empty_like(mean), torch.empty_like(mean)


@_affine_op.register_fake
def _(x, scale, shift):
    return torch.empty_like(x, memory_format=output_memory_format(x))


@_affine_backward_op.register_fake
def _(dy, x):
    stats = x.new_empty((x.shape[1],), dtype=stats_dtype(x.dtype))
    return stats, torch.empty_like(stats)


# ---------------------------------------------------------------------------
# autograd, shared by the ops and the eager autograd.Functions


def composite_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    act: Activation = activations.IDENTITY,
) -> Tensor:
    """Training-mode ``act(BN(x) + residual)`` in differentiable torch ops."""
    sdtype = stats_dtype(x.dtype)
    xs = x.to(sdtype)
    dims = reduce_dims(x)
    mean = xs.mean(dims, keepdim=True)  # 1,C,1..
    xmu = xs - mean  # like x
    z = xmu * torch.rsqrt((xmu * xmu).mean(dims, keepdim=True) + eps)  # like x: xhat
    if weight is not None:
        z = z * per_channel(weight.to(sdtype), x)
    if bias is not None:
        z = z + per_channel(bias.to(sdtype), x)
    z = z.to(x.dtype)
    if residual is not None:
        z = z + residual
    return activations.forward(z, act)


def _composite_backward(ctx, dy: Tensor, saved: dict) -> tuple[Tensor | None, ...]:
    """The backward as the gradient of :func:`composite_forward`, for double backward:
    the statistics are recomputed from ``x``, so their own dependence on ``x``
    is part of the graph (the saved ones are constants to autograd)."""
    inputs = [saved["x"], saved["weight"], saved["bias"], saved["residual"]]
    wanted = [t is not None and need for t, need in zip(inputs, ctx.needs_input_grad[:4], strict=True)]
    y = composite_forward(*inputs[:3], ctx.eps, inputs[3], ctx.act)
    grads = iter(torch.autograd.grad(y, [t for t, w in zip(inputs, wanted, strict=True) if w], dy, create_graph=True))
    return tuple(next(grads) if w else None for w in wanted)


def _forward_train_setup(ctx, inputs, output):
    x, weight, bias, eps, residual, activation, act_param = (*inputs, None, "identity", 0.0)[:7]
    y, mean, var, mask = output
    ctx.mark_non_differentiable(mean, var, mask)
    ctx.eps = eps
    ctx.act = Activation(activation, act_param)
    ctx.has_residual = residual is not None
    ctx.keeps_output = residual is not None and activation == "elu"
    ctx.keeps_residual = residual is not None and activation == "silu"
    ctx.save_for_backward(
        x, weight, bias, mean, var,
        mask if mask.numel() else None,
        y if ctx.keeps_output else None,
        residual if ctx.keeps_residual else None,
    )  # fmt: skip


def _train_backward_using(backward_train, backward_train_residual, affine):
    def backward(ctx, dy, _dmean, _dvar, _dmask):
        x, weight, bias, mean, var, mask, y, residual = ctx.saved_tensors
        act = ctx.act
        if torch.is_grad_enabled():  # the backward is itself differentiated
            if ctx.has_residual and residual is None:
                raise RuntimeError(
                    f"double backward through a fused residual add with activation {act} is not supported: "
                    "the residual is not kept (only a sign mask or the output); apply the add outside the layer"
                )
            saved = {"x": x, "weight": weight, "bias": bias, "residual": residual}
            dx, dweight, dbias, dresidual = _composite_backward(ctx, dy, saved)
            return dx, dweight, dbias, None, dresidual, None, None
        invstd = torch.rsqrt(var + ctx.eps)
        dresidual = None
        if not ctx.has_residual:  # the backend applies act'(BN(x)) itself, recomputed from x
            dx, sum_dz, sum_dz_xmu = backward_train(dy, x, mean, invstd, weight, bias, act.name, act.param)
        elif mask is not None:  # ReLU/LeakyReLU after the add: act' from the sign mask, in the backend
            dx, dresidual, sum_dz, sum_dz_xmu = backward_train_residual(
                dy, x, mean, invstd, weight, mask, act.name, act.param
            )
        else:  # dz = dy * act'(BN(x) + residual): the identity, from the output, or recomputed
            if act.name == "identity":
                dz = dy
            elif y is not None:
                dz = dy * activations.grad_from_output(y, act)
            else:
                z = affine(x, *affine_from_stats(mean, invstd, weight, bias)) + residual
                dz = dy * activations.grad_from_input(z, act)
            dx, sum_dz, sum_dz_xmu = backward_train(dz, x, mean, invstd, weight)
            dresidual = dz
        dweight = None if weight is None else (sum_dz_xmu * invstd).to(weight.dtype)
        dbias = None if bias is None else sum_dz.to(bias.dtype)
        return dx, dweight, dbias, None, dresidual, None, None

    return backward


def _affine_setup(ctx, inputs, output):
    x, scale, _ = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, scale)


def _affine_backward_using(affine, affine_backward):
    def backward(ctx, dy):
        x, scale = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad
        if torch.is_grad_enabled():  # differentiable composite, for double backward
            dims = reduce_dims(dy)
            dx = (dy * per_channel(scale, dy)).to(dy.dtype) if need_x else None
            dscale = (dy * x).sum(dims).to(scale.dtype) if need_scale else None
            dshift = dy.sum(dims).to(scale.dtype) if need_shift else None
            return dx, dscale, dshift
        dx = affine(dy, scale, torch.zeros_like(scale)) if need_x else None
        dscale = dshift = None
        if need_scale:
            dshift, dscale = affine_backward(dy, x)
        elif need_shift:
            dshift = dy.sum(reduce_dims(dy), dtype=scale.dtype)
        return dx, dscale, dshift

    return backward


_forward_train_op.register_autograd(
    _train_backward_using(_backward_train_op, _backward_train_residual_op, _affine_op),
    setup_context=_forward_train_setup,
)
_affine_op.register_autograd(_affine_backward_using(_affine_op, _affine_backward_op), setup_context=_affine_setup)


class _TrainFunction(torch.autograd.Function):
    """The eager path: the same implementation without the op dispatcher's overhead."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual, activation, act_param):
        output = _forward_train_impl(x, weight, bias, eps, residual, activation, act_param)
        _forward_train_setup(ctx, (x, weight, bias, eps, residual, activation, act_param), output)
        return output

    backward = staticmethod(_train_backward_using(_backward_train_impl, _backward_train_residual_impl, _affine_impl))


class _AffineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift):
        output = _affine_impl(x, scale, shift)
        _affine_setup(ctx, (x, scale, shift), output)
        return output

    backward = staticmethod(_affine_backward_using(_affine_impl, _affine_backward_impl))


def _needs_autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _forward_train(x, weight, bias, eps, residual=None, act: Activation = activations.IDENTITY):
    args = (x, weight, bias, eps, residual, act.name, act.param)
    if torch.compiler.is_compiling():
        return _forward_train_op(*args)
    if _needs_autograd(x, weight, bias, residual):
        return _TrainFunction.apply(*args)
    return _forward_train_impl(*args)


def _affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return _affine_op(x, scale, shift)
    if _needs_autograd(x, scale, shift):
        return _AffineFunction.apply(x, scale, shift)
    return _affine_impl(x, scale, shift)


# ---------------------------------------------------------------------------
# public functions


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x * scale[c] + shift[c]`` per channel (dim 1): a frozen batch norm; differentiable,
    and taking the same path as :func:`batch_norm` (our kernel, or torch's ops where a tool needs them)."""
    if x.numel() == 0 or _route.tool_needs_torch_ops() or _route.prefers_torch_kernel(x, None, None):
        return _torch_ops.affine(x, scale, shift)
    return _affine(x, scale, shift)


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
    return affine_from_stats(running_mean, torch.rsqrt(running_var + eps), weight, bias)


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
    """Fold one batch's statistics into the running estimates, in place.

    ``running = (1 - f) * running + f * batch`` with ``f = momentum`` (torch's
    convention: the weight of the new batch) or, for ``momentum=None``,
    ``f = 1 / num_batches_tracked`` (cumulative average). The running variance
    takes the unbiased batch variance ``var * count / (count - 1)``.

    With ``skip_nonfinite`` a batch whose mean or variance holds NaN/Inf leaves
    the running statistics and ``num_batches_tracked`` untouched and adds one
    to ``nonfinite_count``. On an accelerator (or while compiling) this is
    decided on the device, with no host sync; for CPU tensors in eager mode,
    where reading a value costs nothing, it is decided in Python, which saves
    most of the small operations.
    """
    if mean.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        # in NumPy, outside autograd (torch.no_grad() costs more than the update at small sizes)
        _update_on_cpu(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                       skip_nonfinite, nonfinite_count)  # fmt: skip
        return
    _torch_ops.update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                              skip_nonfinite, nonfinite_count)  # fmt: skip


_NUMPY_DTYPES = (torch.float32, torch.float64)
_EMPTY = np.empty(0)


def _update_on_cpu(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                   skip_nonfinite, nonfinite_count) -> None:  # fmt: skip
    """:func:`update_running_stats` for CPU tensors, decided and computed in NumPy on the
    ``C``-sized arrays (each torch call costs more than the arithmetic here)."""
    buffers = [t for t in (running_mean, running_var, num_batches_tracked, nonfinite_count) if t is not None]
    if not all(t.dtype in _NUMPY_DTYPES or t.dtype == torch.int64 for t in (*buffers, mean, var)):
        _update_on_cpu_torch(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                             skip_nonfinite, nonfinite_count)  # fmt: skip
        return
    if momentum is not None:
        factor = momentum
    elif num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    else:  # the cumulative average's weight, counting this batch
        factor = 1.0 / max(int(num_batches_tracked) + 1, 1)
    # torch's formula: running = (1 - f) * running + f * batch, the variance unbiased
    var_factor = factor * count / (count - 1) if count > 1 else factor
    rm = _EMPTY if running_mean is None else running_mean.detach().numpy()
    rv = _EMPTY if running_var is None else running_var.detach().numpy()
    if not _cpu_update.running_update(rm, rv, mean.detach().numpy(), var.detach().numpy(), factor, var_factor,
                                      skip_nonfinite):  # fmt: skip
        if nonfinite_count is not None:
            _add_one(nonfinite_count)
        return
    for running in (running_mean, running_var):
        if running is not None:
            torch.autograd.graph.increment_version(running)  # written behind torch's back: say so
    if num_batches_tracked is not None:
        _add_one(num_batches_tracked)


def _count_batch(num_batches_tracked: Tensor | None, momentum: float | None) -> float:
    """Count the batch (in place) and return the weight of its statistics."""
    if num_batches_tracked is not None:
        _add_one(num_batches_tracked)
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return 1.0 / max(int(num_batches_tracked), 1)


def _add_one(counter: Tensor) -> None:
    if counter.dtype in (torch.int64, *_NUMPY_DTYPES):
        counter.detach().numpy()[...] += 1
        torch.autograd.graph.increment_version(counter)
    else:
        counter.add_(1)


def _update_on_cpu_torch(running_mean, running_var, mean, var, count, momentum, num_batches_tracked,
                         skip_nonfinite, nonfinite_count) -> None:  # fmt: skip
    """The same with torch calls, for dtypes NumPy lacks (bfloat16/float16 buffers)."""
    if skip_nonfinite and not (bool(mean.isfinite().all()) and bool(var.isfinite().all())):
        if nonfinite_count is not None:
            _add_one(nonfinite_count)
        return
    factor = _count_batch(num_batches_tracked, momentum)
    running, batch = [], []
    for r, b in ((running_mean, mean), (running_var, var * (count / (count - 1)) if count > 1 else var)):
        if r is not None:
            running.append(r)
            batch.append(b if b.dtype == r.dtype else b.to(r.dtype))
    with torch.no_grad():
        torch._foreach_lerp_(running, batch, factor)  # running += factor * (batch - running)


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
    """
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            skip_nonfinite, nonfinite_count, activation, residual, memory_efficient, inplace)  # fmt: skip
    if torch.jit.is_tracing():
        with warnings.catch_warnings():
            # our checks read sizes, which a trace records as constants (as it does torch's layer's)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _batch_norm(*args)
    return _batch_norm(*args)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                skip_nonfinite, nonfinite_count, activation, residual, memory_efficient,
                inplace) -> Tensor:  # fmt: skip
    check_input(input, running_mean, running_var, weight, bias, training, eps)
    act = activations.parse(activation)
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
        # a broadcast or a type promotion: normalize fused, then add and activate as torch ops
        try:
            torch.broadcast_shapes(input.shape, residual.shape)
        except RuntimeError:
            raise ShapeError(
                f"residual must broadcast to the input {tuple(input.shape)}, got {tuple(residual.shape)}"
            ) from None
        y = batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked=num_batches_tracked, skip_nonfinite=skip_nonfinite,
            nonfinite_count=nonfinite_count, memory_efficient=memory_efficient,
        )  # fmt: skip
        return activations.forward(y + residual, act)
    grad_needed = _needs_autograd(input, weight, bias, residual)
    # training that keeps only the output: asked for, or the only way to overwrite an input autograd needs
    keeps_output = training and (memory_efficient or (inplace and grad_needed))
    if keeps_output:
        _memory_efficient.check(act, weight, residual, "memory_efficient=True" if memory_efficient else
                                "inplace=True in training")  # fmt: skip
    if inplace and grad_needed and not training and input.numel() > 0:
        return _eval_in_place(input, running_mean, running_var, weight, bias, eps, act, residual)
    if (
        input.numel() == 0
        or _route.tool_needs_torch_ops()
        or (not keeps_output and _route.prefers_torch_kernel(input, weight, bias))
    ):
        # torch's own kernel, and torch's add and activation after it, with torch's autograd
        in_transform = _route.in_functorch_transform()
        if in_transform and training and (running_mean is not None or running_var is not None):
            return _in_transform_updating(
                input, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked, act, residual
            )
        y = _torch_ops.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            skip_nonfinite, nonfinite_count, act.name, act.param, residual,
        )  # fmt: skip
        return input.copy_(y) if inplace else y
    if keeps_output:  # with inplace, the output is written over the input
        y, mean, var = _memory_efficient.MemoryEfficientBatchNorm.apply(
            input, weight, bias, eps, act, inplace, _forward_train_impl
        )
        _update_if_kept(running_mean, running_var, mean, var, input, momentum, num_batches_tracked,
                        skip_nonfinite, nonfinite_count)  # fmt: skip
        return y
    if not training:
        scale, shift = inference_affine(running_mean, running_var, weight, bias, eps)
        y = _torch_ops.activate(_affine(input, scale, shift), residual, act.name, act.param, False)
        return input.copy_(y) if inplace else y
    y, mean, var, _ = _forward_train(input, weight, bias, eps, residual, act)
    _update_if_kept(running_mean, running_var, mean, var, input, momentum, num_batches_tracked,
                    skip_nonfinite, nonfinite_count)  # fmt: skip
    return input.copy_(y) if inplace else y


def _eval_in_place(input, running_mean, running_var, weight, bias, eps, act, residual) -> Tensor:
    """Eval over the input while autograd records: torch's in-place multiply-add (autograd keeps
    what their backward needs), the residual add and the activation in place after it."""
    scale, shift = inference_affine(running_mean, running_var, weight, bias, eps)
    y = input.mul_(per_channel(scale, input)).add_(per_channel(shift, input))
    if residual is not None:
        y.add_(residual)
    return activations.apply_(y, act)


torch.fx.wrap("batch_norm")  # symbolic tracing records a call, rather than tracing into the checks


def _update_if_kept(running_mean, running_var, mean, var, input, momentum, num_batches_tracked,
                    skip_nonfinite, nonfinite_count) -> None:  # fmt: skip
    if running_mean is not None or running_var is not None:
        update_running_stats(
            running_mean, running_var, mean, var, input.numel() // input.shape[1], momentum,
            num_batches_tracked, skip_nonfinite, nonfinite_count,
        )  # fmt: skip


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
