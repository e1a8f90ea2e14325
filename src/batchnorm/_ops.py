"""Our kernels behind autograd: the implementations, their ``torch.library`` ops
(what ``torch.compile`` sees, one node each), the fakes, and the backward.

* ``batchnorm::forward_train(x, weight, bias, eps, residual, activation, act_param)
  -> (y, mean, var, invstd, mask)``: ``y = act(BN(x) + residual)``; ``invstd`` is
  the one the forward normalized with (the backward reuses it); ``mask`` is the
  bit mask of ``BN(x) + residual > 0`` (``kernels.sign_mask``) where the
  activation's derivative after a residual comes from it, else empty
* ``batchnorm::backward_train(dy, x, mean, invstd, weight, bias, activation, act_param)
  -> (dx, sum_dz, sum_dz_xmu)``, the activation's derivative recomputed from x
* ``batchnorm::backward_train_residual(dy, x, mean, invstd, weight, mask, activation,
  act_param) -> (dx, dresidual, sum_dz, sum_dz_xmu)``, from the mask
* ``batchnorm::affine(x, scale, shift) -> y`` (eval: one multiply-add) and its
  reduction ``batchnorm::affine_backward(dy, x) -> (sum_dy, sum_dy_x)``

In eager mode the same implementations run under ``autograd.Function``s
(:func:`forward_train`, :func:`affine`), without the op dispatcher's overhead.
How the backward gets the activation's derivative after a residual is the
activation's ``after_residual`` (``activations.KINDS``). A backward that is
itself differentiated runs :func:`composite_forward`'s gradient instead.
:class:`NormalizeWithStats` normalizes with statistics computed elsewhere (the
synchronized layer's), and its backward combines the sums before ``dx``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from . import activations, kernels
from ._layout import as_ncl, output_memory_format, per_channel, prepare, reduce_dims, restore
from .activations import IDENTITY, Activation
from .kernels import sign_mask
from .numerics import affine_from_stats, stats_dtype

Tensor = torch.Tensor


def _no_mask(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.uint8)


def _fused_in_backend(residual: Tensor | None, act: Activation) -> bool:
    """Whether the backend's residual path runs the add (and keeps a mask): the identity, or an
    activation whose derivative after the add comes from the sign mask."""
    return residual is not None and act.kind.after_residual in ("one", "mask")


# ---------------------------------------------------------------------------
# implementations (plain functions; the ops and the eager Functions share them)


def _forward_train_impl(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    activation: str = "identity",
    act_param: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``act(BN(x) + residual)``; returns ``(y, mean, var, invstd, mask)``."""
    x = prepare(x)
    x3 = as_ncl(x)
    act = Activation(activation, act_param)
    backend = kernels.select(x3, fused=residual is not None or act != IDENTITY)
    if residual is None:
        y3, mean, var, invstd = backend.forward_train(x3, weight, bias, eps, act)
        return restore(y3, x), mean, var, invstd, _no_mask(x)
    if _fused_in_backend(residual, act):
        r3 = as_ncl(residual.contiguous(memory_format=output_memory_format(x)))
        y3, mean, var, invstd, mask = backend.forward_train_residual(x3, weight, bias, eps, r3, act)
        return restore(y3, x), mean, var, invstd, (_no_mask(x) if mask is None else mask)
    y3, mean, var, invstd = backend.forward_train(x3, weight, bias, eps)
    y = restore(y3, x).add_(residual)
    return activations.apply_(y, act), mean, var, invstd, _no_mask(x)


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
    act = Activation(activation, act_param)
    backend = kernels.select(x3, fused=act != IDENTITY)
    dx3, sum_dz, sum_dz_xmu = backend.backward_train(dy3, x3, mean, invstd, weight, bias, act)
    return restore(dx3, x), sum_dz, sum_dz_xmu


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
    """``(dx, dresidual, sum_dz, sum_dz_xmu)`` for ``y = act(BN(x) + residual)``, ``dz = dy * act'``
    read from the forward's sign mask."""
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
# the torch.library ops and their fakes


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
    act = Activation(activation, act_param)
    mask = sign_mask.empty(as_ncl(prepare(x))) if _fused_in_backend(residual, act) and act.keeps_mask else _no_mask(x)
    return y, stats, torch.empty_like(stats), torch.empty_like(stats), mask


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
    act: Activation = IDENTITY,
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
    y, mean, var, invstd, mask = output
    ctx.mark_non_differentiable(mean, var, invstd, mask)
    ctx.eps = eps
    ctx.act = Activation(activation, act_param)
    after = ctx.act.kind.after_residual if residual is not None else None
    ctx.has_residual = residual is not None
    ctx.save_for_backward(
        x, weight, bias, mean, invstd,
        mask if mask.numel() else None,
        y if after == "output" else None,
        residual if after == "residual" else None,
    )  # fmt: skip


def _train_backward_using(backward_train, backward_train_residual, affine):
    def backward(ctx, dy, _dmean, _dvar, _dinvstd, _dmask):
        x, weight, bias, mean, invstd, mask, y, residual = ctx.saved_tensors
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
        dresidual = None
        if not ctx.has_residual:  # the backend applies act'(BN(x)) itself, recomputed from x
            dx, sum_dz, sum_dz_xmu = backward_train(dy, x, mean, invstd, weight, bias, act.name, act.param)
        elif mask is not None:  # act' from the sign mask, in the backend
            dx, dresidual, sum_dz, sum_dz_xmu = backward_train_residual(
                dy, x, mean, invstd, weight, mask, act.name, act.param
            )
        else:  # dz = dy * act'(BN(x) + residual): a factor of one, from the output, or recomputed
            if act.kind.grad is None:
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


def needs_autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def forward_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
    act: Activation = IDENTITY,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training ``act(BN(x) + residual)`` through our kernels: the op while compiling, else the
    eager Function (or the bare implementation when nothing needs a gradient);
    returns ``(y, mean, var, invstd, mask)``."""
    args = (x, weight, bias, eps, residual, act.name, act.param)
    if torch.compiler.is_compiling():
        return _forward_train_op(*args)
    if needs_autograd(x, weight, bias, residual):
        return _TrainFunction.apply(*args)
    return _forward_train_impl(*args)


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x * scale[c] + shift[c]`` through our kernels, differentiable."""
    if torch.compiler.is_compiling():
        return _affine_op(x, scale, shift)
    if needs_autograd(x, scale, shift):
        return _AffineFunction.apply(x, scale, shift)
    return _affine_impl(x, scale, shift)


def apply_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None, act: Activation) -> Tensor:
    """Eval ``act(x * scale[c] + shift[c] [+ residual])`` through our kernels in one call, where
    autograd need not see it (``residual``: x's shape and dtype)."""
    x = prepare(x)
    x3 = as_ncl(x)
    r3 = None if residual is None else as_ncl(residual)
    fused = residual is not None or act != IDENTITY
    return restore(kernels.select(x3, fused, training=False).apply_act(x3, scale, shift, r3, act), x)


# ---------------------------------------------------------------------------
# normalizing with statistics computed elsewhere (the synchronized layer)


class NormalizeWithStats(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with ``mean``/``invstd`` taken over ``count``
    values per channel somewhere else (every rank's), constants to autograd; the backward
    reduces this input's sums, passes them through ``combine`` (e.g. an all-reduce, which must
    run on every caller even when x needs no gradient) and applies them over ``count``."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count: int, combine: Callable[[Tensor, Tensor], tuple]):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.combine, ctx.bias_dtype = count, combine, None if bias is None else bias.dtype
        if x.numel() == 0:
            return torch.empty_like(x, memory_format=output_memory_format(x))
        return _affine_impl(x, *affine_from_stats(mean, invstd, weight, bias))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        x3 = as_ncl(prepare(x))
        dy3 = as_ncl(dy.contiguous(memory_format=output_memory_format(x)))
        backend = kernels.select(x3)
        if x.numel() > 0:
            sum_dy, sum_dy_xmu = backend.backward_reduce(dy3, x3, mean)  # C, C: this input's
        else:
            sum_dy, sum_dy_xmu = torch.zeros_like(mean), torch.zeros_like(mean)
        all_dy, all_dy_xmu = ctx.combine(sum_dy, sum_dy_xmu)
        dx = None
        if ctx.needs_input_grad[0]:
            if x.numel() > 0:
                dx = restore(backend.backward_apply(dy3, x3, mean, invstd, weight, all_dy, all_dy_xmu, ctx.count), x)
            else:
                dx = torch.empty_like(x, memory_format=output_memory_format(x))
        # parameter gradients are this input's share, as for any other parameter (DDP adds them up)
        dweight = None if weight is None else (sum_dy_xmu * invstd).to(weight.dtype)
        dbias = None if ctx.bias_dtype is None else sum_dy.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None, None
