"""The launcher of the ``numba`` backend: :class:`NumbaBackend`.

It maps the canonical ``(N, C, L)`` view onto one of two C-contiguous layouts (``ncl``,
or ``nlc`` rows of ``C`` for channels-last and ``(B, N)`` input; anything else is copied
to contiguous first), allocates outputs with x's strides (``memory``), picks the work
split for the thread count (``threads``) and calls the kernels of ``loops`` and
``residual_loops``, per activation. It decides when the automatic choice takes this
backend (:meth:`NumbaBackend.prefers`); it holds no Numba code and no activation's
formula (those are in the loop modules, keyed by the activation's name).
"""

from __future__ import annotations

import numpy as np
import torch

from ...activations import IDENTITY, Activation
from .. import sign_mask
from ..base import Backend, count_of
from . import ghost_loops, loops, masked_loops, residual_loops, threads
from .memory import NP_DTYPE, empty_like

Tensor = torch.Tensor

# Up to this many elements a CPU float32/float64 call is left to torch's own batch-norm
# kernel (with its C++ autograd), then torch's add and activation when fused: below it the
# cost of our Python layer outweighs the kernels' gain (the crossover is in
# benchmarks/README.md, "Thresholds").
SMALL_NUMEL = 1 << 18
# (B, N) inputs (L == 1) below this many elements are left to torch's kernels too (same place).
PREFER_MIN_ROWS_NUMEL = 1 << 20
# Plain training (no activation or residual fused) below this many elements is left to torch's
# kernel, NCHW and channels-last; our fused kernels win from SMALL_NUMEL on (same place).
PREFER_PLAIN_MIN_NUMEL = 1 << 20
PREFER_PLAIN_CHANNELS_LAST_MIN_NUMEL = 1 << 22
# Eval (one multiply-add per element) below this many bytes of output is left to torch's
# kernel: there it is faster than ours; above, torch's fresh output faults its pages in on
# every call (glibc maps allocations of 32 MiB and more afresh) and our pooled one does not.
PREFER_EVAL_MIN_BYTES = 32 << 20
# ncl: with at least this many channels per thread, one work item per channel
# (statistics and normalization while the channel is in cache); else split the batch.
CHANNELS_PER_THREAD = 4
# nlc: row blocks per thread (each thread normalizes the rows it summed, some still in cache).
BLOCKS_PER_THREAD = 1
# ncl, masked: with valid runs shorter than this on average, whole rows with a select per value
# (a run's loop remainder costs more than reading the padded values; batchnorm bench --modes masked)
MASKED_RUN_MIN = 128
# ncl: bytes of each input a block of channels may span, so the block's second pass reads
# it from the core's L2 cache (1 MiB or more on current x86 cores).
CACHE_BLOCK_BYTES = 1 << 18


def _layout(x: Tensor) -> tuple[str, Tensor]:
    """``("ncl" | "nlc", x)`` with x made dense in one of the two layouts if it was not
    (the layouts of ``sign_mask``)."""
    layout = sign_mask.layout(x)
    if layout == "ncl" or x.shape[2] == 1:
        return layout, x.contiguous()
    return layout, x


def _view(t: Tensor, layout: str) -> np.ndarray:
    """The C-contiguous NumPy view of ``t`` (N,C,L) for ``layout`` (no copy)."""
    a = t.detach().numpy()  # N,C,L with t's strides
    if layout == "ncl":
        return a
    return a.transpose(0, 2, 1).reshape(-1, a.shape[1])  # N*L,C: a view, as t is dense channels-last


def _like(t: Tensor, layout: str) -> Tensor:
    """``t`` copied, if needed, into ``layout`` (for a gradient that arrives in another layout)."""
    if layout == "ncl":
        return t.contiguous()
    if t.permute(0, 2, 1).is_contiguous():
        return t
    return t.permute(0, 2, 1).contiguous().permute(0, 2, 1)


def _vec(v: Tensor | None, c: int, dtype: torch.dtype, fill: float) -> np.ndarray:
    """A per-channel vector as a contiguous NumPy array of x's dtype (``fill`` where ``None``)."""
    if v is None:
        return np.full(c, fill, dtype=NP_DTYPE[dtype])
    a = v.detach().numpy() if v.dtype == dtype else v.detach().to(dtype).numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _scalar(value: float, dtype: torch.dtype) -> np.generic:
    """``value`` as a scalar of x's dtype (what the kernels compute in)."""
    return NP_DTYPE[dtype](value)


def _slope(act: Activation, dtype: torch.dtype) -> np.generic:
    """The one parameter the kernels take: the slope below zero for the activations with a sign
    mask (ReLU: 0), else the activation's own (ELU's alpha; 0 if it has none)."""
    return _scalar(act.negative_slope if act.keeps_mask else act.param, dtype)


def _forward_scalars(weight, bias, eps: float, act: Activation, x: Tensor) -> tuple:
    """``(w, b, eps, slope)`` as the training forward kernels take them, in x's dtype."""
    c = x.shape[1]
    return _vec(weight, c, x.dtype, 1.0), _vec(bias, c, x.dtype, 0.0), _scalar(eps, x.dtype), _slope(act, x.dtype)


def _channel_vectors(mean, invstd, weight, bias, c: int, dtype: torch.dtype) -> tuple[np.ndarray, ...]:
    """``(mean, invstd, w, b)`` as the backward kernels take them (``chan``)."""
    defaults = ((mean, 0.0), (invstd, 1.0), (weight, 1.0), (bias, 0.0))
    return tuple(_vec(v, c, dtype, fill) for v, fill in defaults)


def _zero_width_mask(x: np.ndarray) -> np.ndarray:
    """The mask argument of the residual forward when no mask is kept: rows of no bytes."""
    return np.empty((*x.shape[:-1], 0), dtype=np.uint8)


def _ncl_splits(threads: int, n: int, c: int) -> int:
    """Parts each channel's ``n`` positions are cut into (1 when there are channels enough)."""
    if threads == 1 or c >= CHANNELS_PER_THREAD * threads:
        return 1
    return max(1, min(n, -(-CHANNELS_PER_THREAD * threads // c)))


def _ncl_block(threads: int, x: Tensor) -> int:
    """Channels per work item on the ncl layout: as many as fit ``CACHE_BLOCK_BYTES`` (small
    images: reads of ``block * L`` values in a row, which the prefetcher follows), keeping
    ``CHANNELS_PER_THREAD`` items per thread."""
    n, c, l = x.shape
    block = max(1, CACHE_BLOCK_BYTES // max(1, n * l * x.element_size()))
    return max(1, min(block, c // (CHANNELS_PER_THREAD * threads)))


def _nlc_splits(threads: int, rows: int) -> int:
    """Row blocks for the nlc kernels."""
    return 1 if threads == 1 else max(1, min(rows, BLOCKS_PER_THREAD * threads))


def _ghost_block(threads: int, x: Tensor, size: int) -> int:
    """:func:`_ncl_block` for ghosts of ``size`` samples: work items are ghosts x channel blocks."""
    n, c, l = x.shape
    ghosts = -(-n // size)
    block = max(1, CACHE_BLOCK_BYTES // max(1, size * l * x.element_size()))
    return max(1, min(block, c, c * ghosts // (CHANNELS_PER_THREAD * threads)))


def _ghost_splits(threads: int, ghosts: int, ghost_rows: int) -> int:
    """Row blocks per ghost for the nlc ghost kernels (enough work items for the threads)."""
    return max(1, min(ghost_rows, -(-BLOCKS_PER_THREAD * threads // ghosts)))


def _channel_outputs(c: int, dtype: torch.dtype, count: int) -> tuple[Tensor, ...]:
    return tuple(torch.empty(c, dtype=dtype) for _ in range(count))


class NumbaBackend(Backend):
    """Numba kernels for float32/float64 CPU tensors; see ``batchnorm.kernels`` for the contract.
    The training paths apply the activations with ``act.kind.in_kernel`` inside the kernels (the
    others compose as in the base class); the residual paths keep the sign mask in the pass
    that writes ``y``."""

    name = "numba"

    def supports(self, x: Tensor) -> bool:
        return x.is_cpu and x.layout == torch.strided and x.dtype in (torch.float32, torch.float64)

    def prefers(self, x: Tensor, fused: bool = False) -> bool:
        """Where ``batchnorm bench`` measured torch's own kernels faster, leave the tensor to them:
        up to ``SMALL_NUMEL`` elements, ``(B, N)`` inputs under ``PREFER_MIN_ROWS_NUMEL``, and
        plain (not ``fused``) layers under ``PREFER_PLAIN_MIN_NUMEL`` (NCHW) or
        ``PREFER_PLAIN_CHANNELS_LAST_MIN_NUMEL`` (channels-last)."""
        numel = x.numel()
        if numel <= SMALL_NUMEL:
            return False
        if x.shape[2] == 1:
            return numel >= PREFER_MIN_ROWS_NUMEL
        if fused:
            return True
        if sign_mask.layout(x) == "nlc":
            return numel >= PREFER_PLAIN_CHANNELS_LAST_MIN_NUMEL
        return numel >= PREFER_PLAIN_MIN_NUMEL

    def prefers_eval(self, x: Tensor, fused: bool = False) -> bool:
        """Eval only from ``PREFER_EVAL_MIN_BYTES`` of output (measured by ``batchnorm bench``)."""
        return x.numel() * x.element_size() >= PREFER_EVAL_MIN_BYTES

    # -- forward --

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation = IDENTITY
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``act(BN(x))`` written by the forward kernel itself (no second pass over y)."""
        if not act.kind.in_kernel:
            return super().forward_train(x, weight, bias, eps, act)
        y, mean, var, invstd = self._forward(x, weight, bias, eps, act, write_y=True)
        return y, mean, var, invstd

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # eps only enters the (unused) invstd; 1.0 keeps a constant channel from dividing by zero
        _, mean, var, _ = self._forward(x, None, None, 1.0, IDENTITY, write_y=False)
        return mean, var

    def _forward(self, x, weight, bias, eps, act, write_y):
        n, c, l = x.shape
        mean, var, invstd = _channel_outputs(c, x.dtype, 3)
        if n * l == 0:  # no values: NaN statistics, as torch.var_mean gives
            for t in (mean, var, invstd):
                t.fill_(float("nan"))
            return (torch.empty_like(x) if write_y else None), mean, var, invstd
        layout, x = _layout(x)
        y = empty_like(x) if write_y else x
        xa, ya = _view(x, layout), _view(y, layout)
        w, b, ex, slope = _forward_scalars(weight, bias, eps, act, x)
        out = (mean.numpy(), var.numpy(), invstd.numpy())
        kernels = loops.training(act.name)
        if layout == "ncl":
            threads.launch(
                kernels.ncl_forward,
                x.numel(),
                lambda t: (xa, w, b, ex, slope, _ncl_splits(t, n * l, c), _ncl_block(t, x), write_y, ya, out),
            )
        else:
            threads.launch(
                kernels.nlc_forward, x.numel(), lambda t: (xa, w, b, ex, slope, _nlc_splits(t, n * l), write_y, ya, out)
            )
        return (y if write_y else None), mean, var, invstd

    def apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        return self._apply(x, scale, shift, None, IDENTITY)

    def apply_act(
        self, x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None = None, act: Activation = IDENTITY
    ) -> Tensor:
        """``act(x * scale + shift [+ residual])`` in one pass of the eval kernel."""
        if not act.kind.in_kernel:
            return super().apply_act(x, scale, shift, residual, act)
        return self._apply(x, scale, shift, residual, act)

    def _apply(self, x, scale, shift, residual, act):
        c = x.shape[1]
        layout, x = _layout(x)
        y = empty_like(x)
        if x.numel() == 0:
            return y
        xa, ya = _view(x, layout), _view(y, layout)
        sa, ba = _vec(scale, c, x.dtype, 1.0), _vec(shift, c, x.dtype, 0.0)
        kernels = loops.evaluation(act.name)
        rows = xa.shape[0] * xa.shape[1] if layout == "ncl" else xa.shape[0]
        slope = _slope(act, x.dtype)
        if residual is None:
            kernel = kernels.ncl_apply if layout == "ncl" else kernels.nlc_apply
            threads.launch(kernel, x.numel(), lambda t: (xa, sa, ba, slope, ya, _nlc_splits(t, rows)))
        else:
            ra = _view(_like(residual.to(x.dtype), layout), layout)
            kernel = kernels.ncl_apply_res if layout == "ncl" else kernels.nlc_apply_res
            threads.launch(kernel, x.numel(), lambda t: (xa, sa, ba, ra, slope, ya, _nlc_splits(t, rows)))
        return y

    # -- backward --

    def backward_train(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None = None,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Both passes of the backward kernel take ``dz = dy * act'(z)``, ``z`` recomputed from x
        (no ``z`` or ``dz`` tensor)."""
        if not act.kind.in_kernel:
            return super().backward_train(dy, x, mean, invstd, weight, bias, act)
        return self._backward(dy, x, mean, invstd, weight, bias, act, mode=1)

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        _, sum_dy, sum_dy_xmu = self._backward(dy, x, mean, None, None, None, IDENTITY, mode=0)
        return sum_dy, sum_dy_xmu

    def backward_apply(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        sum_dy: Tensor,
        sum_dy_xmu: Tensor,
        count: int | None = None,
    ) -> Tensor:
        dx, _, _ = self._backward(
            dy, x, mean, invstd, weight, None, IDENTITY, mode=2, sums=(sum_dy, sum_dy_xmu), count=count
        )
        return dx

    def _backward(self, dy, x, mean, invstd, weight, bias, act, mode, sums=None, count=None):
        """``mode`` 0: the sums; 1: the sums and dx; 2: dx from ``sums`` over ``count`` values."""
        n, c, l = x.shape
        dtype = x.dtype
        if mode == 2:
            sum_dy, sum_dy_xmu = sums
            sa = (_vec(sum_dy, c, dtype, 0.0), _vec(sum_dy_xmu, c, dtype, 0.0))
        else:
            sum_dy, sum_dy_xmu = _channel_outputs(c, dtype, 2)
            sa = (sum_dy.numpy(), sum_dy_xmu.numpy())
        if n * l == 0:  # no values: zero sums
            if mode != 2:
                sum_dy.zero_()
                sum_dy_xmu.zero_()
            return torch.empty_like(x), sum_dy, sum_dy_xmu
        layout, x = _layout(x)
        dy = _like(dy.to(dtype), layout)
        dx = empty_like(x) if mode != 0 else x
        xa, ga, dxa = _view(x, layout), _view(dy, layout), _view(dx, layout)
        chan = _channel_vectors(mean, invstd, weight, bias, c, dtype)
        slope, total = _slope(act, dtype), int(count_of(x, count))
        kernels = loops.training(act.name)
        if layout == "ncl":
            threads.launch(
                kernels.ncl_backward,
                x.numel(),
                lambda t: (ga, xa, chan, slope, total, _ncl_splits(t, n * l, c), _ncl_block(t, x), mode, dxa, sa),
            )
        else:
            threads.launch(
                kernels.nlc_backward,
                x.numel(),
                lambda t: (ga, xa, chan, slope, total, _nlc_splits(t, n * l), mode, dxa, sa),
            )
        return (dx if mode != 0 else None), sum_dy, sum_dy_xmu

    # -- ghost batches --

    def forward_train_ghosts(
        self, x: Tensor, size: int, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation = IDENTITY
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All ghosts in one launch of ``ghost_loops``' forward (the activation in the kernel)."""
        n, c, l = x.shape
        if not act.kind.in_kernel or n * l == 0:
            return super().forward_train_ghosts(x, size, weight, bias, eps, act)
        ghosts = -(-n // size)
        layout, x = _layout(x)
        y = empty_like(x)
        mean, var, invstd = (torch.empty(ghosts, c, dtype=x.dtype) for _ in range(3))
        xa, ya = _view(x, layout), _view(y, layout)
        w, b, ex, slope = _forward_scalars(weight, bias, eps, act, x)
        out = (mean.numpy(), var.numpy(), invstd.numpy())
        kernels = ghost_loops.training(act.name)
        if layout == "ncl":
            threads.launch(
                kernels.ncl_forward_ghosts,
                x.numel(),
                lambda t: (xa, size, w, b, ex, slope, _ghost_block(t, x, size), ya, out),
            )
        else:
            threads.launch(
                kernels.nlc_forward_ghosts,
                x.numel(),
                lambda t: (xa, size * l, w, b, ex, slope, _ghost_splits(t, ghosts, size * l), ya, out),
            )
        return y, mean, var, invstd

    def backward_train_ghosts(
        self,
        dy: Tensor,
        x: Tensor,
        size: int,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None = None,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Both passes of every ghost in one launch of ``ghost_loops``' backward."""
        n, c, l = x.shape
        if not act.kind.in_kernel or n * l == 0:
            return super().backward_train_ghosts(dy, x, size, mean, invstd, weight, bias, act)
        ghosts, dtype = -(-n // size), x.dtype
        layout, x = _layout(x)
        dy = _like(dy.to(dtype), layout)
        dx = empty_like(x)
        sum_dz, sum_dz_xmu = (torch.empty(ghosts, c, dtype=dtype) for _ in range(2))
        xa, ga, dxa = _view(x, layout), _view(dy, layout), _view(dx, layout)
        chan = (
            mean.detach().to(dtype).contiguous().numpy(),
            invstd.detach().to(dtype).contiguous().numpy(),
            _vec(weight, c, dtype, 1.0),
            _vec(bias, c, dtype, 0.0),
        )
        slope, sa = _slope(act, dtype), (sum_dz.numpy(), sum_dz_xmu.numpy())
        kernels = ghost_loops.training(act.name)
        if layout == "ncl":
            threads.launch(
                kernels.ncl_backward_ghosts,
                x.numel(),
                lambda t: (ga, xa, size, chan, slope, _ghost_block(t, x, size), dxa, sa),
            )
        else:
            threads.launch(
                kernels.nlc_backward_ghosts,
                x.numel(),
                lambda t: (ga, xa, size * l, chan, slope, _ghost_splits(t, ghosts, size * l), dxa, sa),
            )
        return dx, sum_dz, sum_dz_xmu

    # -- masked --

    def forward_train_masked(
        self,
        x: Tensor,
        valid: Tensor,
        count: int,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One launch of ``masked_loops``' forward on the mask's runs (padded values never read)."""
        n, c, l = x.shape
        if not act.kind.in_kernel:
            return super().forward_train_masked(x, valid, count, weight, bias, eps, act)
        layout, x = _layout(x)
        y = empty_like(x)
        mean, var, invstd = _channel_outputs(c, x.dtype, 3)
        offsets, runs = masked_loops.valid_runs(valid.contiguous().numpy())
        xa, ya = _view(x, layout), _view(y, layout)
        w, b, ex, slope = _forward_scalars(weight, bias, eps, act, x)
        out = (mean.numpy(), var.numpy(), invstd.numpy())
        kernels = masked_loops.training(act.name)
        if layout == "ncl" and masked_loops.mean_run(offsets, runs) < MASKED_RUN_MIN:
            first, va = masked_loops.first_valid(offsets, runs), valid.contiguous().numpy()
            threads.launch(
                kernels.ncl_forward_selected,
                x.numel(),
                lambda t: (xa, va, first, count, w, b, ex, slope, _ncl_block(t, x), ya, out),
            )
        elif layout == "ncl":
            threads.launch(
                kernels.ncl_forward_masked,
                x.numel(),
                lambda t: (xa, offsets, runs, count, w, b, ex, slope, _ncl_block(t, x), ya, out),
            )
        else:
            threads.launch(
                kernels.nlc_forward_masked,
                x.numel(),
                lambda t: (xa, l, offsets, runs, count, w, b, ex, slope, _nlc_splits(t, n), ya, out),
            )
        return y, mean, var, invstd

    def backward_train_masked(
        self,
        dy: Tensor,
        x: Tensor,
        valid: Tensor,
        count: int,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None = None,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Both passes in one launch of ``masked_loops``' backward, on the mask's runs."""
        n, c, l = x.shape
        if not act.kind.in_kernel:
            return super().backward_train_masked(dy, x, valid, count, mean, invstd, weight, bias, act)
        dtype = x.dtype
        layout, x = _layout(x)
        dy = _like(dy.to(dtype), layout)
        dx = empty_like(x)
        sum_dz, sum_dz_xmu = _channel_outputs(c, dtype, 2)
        offsets, runs = masked_loops.valid_runs(valid.contiguous().numpy())
        xa, ga, dxa = _view(x, layout), _view(dy, layout), _view(dx, layout)
        chan = _channel_vectors(mean, invstd, weight, bias, c, dtype)
        slope, sa = _slope(act, dtype), (sum_dz.numpy(), sum_dz_xmu.numpy())
        kernels = masked_loops.training(act.name)
        if layout == "ncl" and masked_loops.mean_run(offsets, runs) < MASKED_RUN_MIN:
            va = valid.contiguous().numpy()
            threads.launch(
                kernels.ncl_backward_selected,
                x.numel(),
                lambda t: (ga, xa, va, count, chan, slope, _ncl_block(t, x), dxa, sa),
            )
        elif layout == "ncl":
            threads.launch(
                kernels.ncl_backward_masked,
                x.numel(),
                lambda t: (ga, xa, offsets, runs, count, chan, slope, _ncl_block(t, x), dxa, sa),
            )
        else:
            threads.launch(
                kernels.nlc_backward_masked,
                x.numel(),
                lambda t: (ga, xa, l, offsets, runs, count, chan, slope, _nlc_splits(t, n), dxa, sa),
            )
        return dx, sum_dz, sum_dz_xmu

    # -- with a residual --

    def forward_train_residual(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor, act: Activation
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """``act(BN(x) + residual)`` and the sign mask written by the kernels in the pass that
        writes y; for nlc the statistics come first from ``nlc_forward`` (x is read twice anyway)."""
        n, c, l = x.shape
        if not act.kind.in_kernel or n * l == 0:
            return super().forward_train_residual(x, weight, bias, eps, residual, act)
        layout, x = _layout(x)
        residual = _like(residual.to(x.dtype), layout)
        y = empty_like(x)
        mean, var, invstd = _channel_outputs(c, x.dtype, 3)
        mask = sign_mask.empty(x) if act.keeps_mask else None
        xa, ra, ya = _view(x, layout), _view(residual, layout), _view(y, layout)
        mka = mask.numpy() if mask is not None else _zero_width_mask(xa)
        w, b, ex, slope = _forward_scalars(weight, bias, eps, act, x)
        out = (mean.numpy(), var.numpy(), invstd.numpy())
        kernels = residual_loops.forward(act.name)
        if layout == "ncl":
            threads.launch(
                kernels.ncl_forward_res,
                x.numel(),
                lambda t: (xa, ra, w, b, ex, slope, _ncl_splits(t, n * l, c), _ncl_block(t, x), ya, mka, out),
            )
        else:
            stats = loops.training(IDENTITY.name).nlc_forward
            threads.launch(stats, x.numel(), lambda t: (xa, w, b, ex, slope, _nlc_splits(t, n * l), False, xa, out))
            coef = np.stack([out[0], w * out[2], b])  # MEAN, SCALE, SHIFT (the kernels' w * invstd)
            threads.launch(
                kernels.nlc_apply_res, x.numel(), lambda t: (xa, ra, ya, mka, coef, slope, _nlc_splits(t, n * l))
            )
        return y, mean, var, invstd, mask

    def backward_train_residual(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        mask: Tensor,
        act: Activation,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Both passes read the mask (no ``dz`` tensor in between); the second writes ``dx`` and
        ``dresidual = dz`` together."""
        n, c, l = x.shape
        if not act.keeps_mask or n * l == 0:
            return super().backward_train_residual(dy, x, mean, invstd, weight, mask, act)
        dtype = x.dtype
        layout, x = _layout(x)
        dy = _like(dy.to(dtype), layout)
        dx, dr = empty_like(x), empty_like(x)
        sum_dz, sum_dz_xmu = _channel_outputs(c, dtype, 2)
        xa, ga, dxa, dra = _view(x, layout), _view(dy, layout), _view(dx, layout), _view(dr, layout)
        mka = mask.contiguous().numpy()
        chan = (_vec(mean, c, dtype, 0.0), _vec(invstd, c, dtype, 1.0), _vec(weight, c, dtype, 1.0))
        slope, sa = _slope(act, dtype), (sum_dz.numpy(), sum_dz_xmu.numpy())
        kernels = residual_loops.BACKWARD
        if layout == "ncl":
            threads.launch(
                kernels.ncl_backward_res,
                x.numel(),
                lambda t: (ga, xa, mka, chan, slope, n * l, _ncl_splits(t, n * l, c), _ncl_block(t, x), dxa, dra, sa),
            )
        else:
            threads.launch(
                kernels.nlc_backward_res,
                x.numel(),
                lambda t: (ga, xa, mka, chan, slope, n * l, _nlc_splits(t, n * l), dxa, dra, sa),
            )
        return dx, dr, sum_dz, sum_dz_xmu
