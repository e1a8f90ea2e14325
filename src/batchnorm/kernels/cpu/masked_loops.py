"""The Numba kernels of masked batch norm (``bn(x, mask=m)``): statistics over the valid
positions only, ``y = act(BN(x))`` there and 0 at the padded ones, and the backward.

The mask, ``(N, L)``, is read once per call into its *runs*: the maximal stretches of
valid positions of each sample, ``(lo, hi)`` pairs, sample ``n``'s from ``offsets[n]`` to
``offsets[n + 1]`` (:func:`valid_runs`; a padded sequence has one run per sample). The
kernels then run the plain kernels' helpers of ``loops`` on the runs, ``x[n, c, lo:hi]``
in the ``ncl`` layout and rows ``n * L + lo .. n * L + hi`` in ``nlc``, and write zeros in
the gaps: padded values (even NaN) are never read, the valid ones are read as densely as
by the plain kernels. Work items: blocks of channels (``ncl``), blocks of samples
(``nlc``). The statistics are shifted by the first valid value of each channel.

Numba keys its disk cache by this file: after editing ``loops`` or ``_helpers``, delete
the cached ``*.nbi``/``*.nbc`` files (see ``_helpers``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from . import loops
from ._helpers import (
    BLOCK,
    ERROR_MODEL,
    MEAN,
    SCALE,
    SHIFT,
    A,
    B,
    block_coefficients,
    finish_block_grads,
    finish_stats,
    grad_coefficients,
    helper,
    kernel_family,
    nlc_shifted_sums,
    parts_merged,
    rows,
    run_sums,
    zero_of,
)

# Bound per activation by ``kernel_family``, as in ``loops``.
act = loops.act
_dz = loops._dz
_run_normalize = loops._run_normalize
_run_grad_sums = loops._run_grad_sums
_run_grad_input = loops._run_grad_input
_nlc_normalize = loops._nlc_normalize
_nlc_grad_sums = loops._nlc_grad_sums
_nlc_grad_input = loops._nlc_grad_input


@numba.njit(cache=True, error_model=ERROR_MODEL)
def valid_runs(valid):
    """``(offsets, runs)`` of the boolean ``valid[N, L]``: ``runs[k] = (lo, hi)``, the maximal
    stretches of True, sample ``n``'s at ``k`` in ``offsets[n] .. offsets[n + 1]``."""
    N, L = valid.shape
    offsets = np.zeros(N + 1, dtype=np.int64)
    runs = np.empty((N * ((L + 1) // 2), 2), dtype=np.int64)  # at most every other position starts one
    k = 0
    for n in range(N):
        lo = -1
        for j in range(L):
            if valid[n, j] and lo < 0:
                lo = j
            elif not valid[n, j] and lo >= 0:
                runs[k, 0], runs[k, 1] = lo, j
                k += 1
                lo = -1
        if lo >= 0:
            runs[k, 0], runs[k, 1] = lo, L
            k += 1
        offsets[n + 1] = k
    return offsets, runs[:k].copy()


def mean_run(offsets, runs) -> float:
    """Valid values per run, on average (what decides between the run kernels and the
    ``selected`` ones in the ``ncl`` layout)."""
    return float((runs[:, 1] - runs[:, 0]).sum()) / max(1, runs.shape[0])


@helper
def first_valid(offsets, runs):
    """``(n, l)`` of the first valid position (the caller makes sure there is one)."""
    n = 0
    while offsets[n + 1] == offsets[n]:
        n += 1
    return n, runs[offsets[n], 0]


# --- ncl: x[N, C, L], one work item per block of channels ---


def ncl_forward_masked(x, offsets, runs, count, w, b, eps, slope, block, y, out):
    """Training forward: ``out = (mean, var, invstd)`` over the ``count`` valid values, ``y =
    act(BN(x))`` on the runs and 0 in the gaps."""
    N, C, _ = x.shape
    n0, l0 = first_valid(offsets, runs)
    for blk in prange((C + block - 1) // block):
        c0 = blk * block
        c1 = min(C, c0 + block)
        acc = np.zeros((c1 - c0, 2))  # block of C: shifted sums
        for n in range(N):
            for c in range(c0, c1):
                for k in range(offsets[n], offsets[n + 1]):
                    s1, s2 = run_sums(x[n, c, runs[k, 0] : runs[k, 1]], x[n0, c, l0])
                    acc[c - c0, 0] += s1
                    acc[c - c0, 1] += s2
        coef = np.empty((c1 - c0, 3), dtype=x.dtype)  # block of C: MEAN, SCALE, SHIFT
        for c in range(c0, c1):
            m, istd = finish_stats(acc[c - c0, 0], acc[c - c0, 1], count, x[n0, c, l0], eps, out, c)
            coef[c - c0, MEAN], coef[c - c0, SCALE], coef[c - c0, SHIFT] = m, w[c] * istd, b[c]
        for n in range(N):
            for c in range(c0, c1):
                yr = y[n, c]  # L
                done = 0
                for k in range(offsets[n], offsets[n + 1]):
                    lo, hi = runs[k, 0], runs[k, 1]
                    yr[done:lo] = 0
                    _run_normalize(x[n, c, lo:hi], yr[lo:hi], coef[c - c0], slope)
                    done = hi
                yr[done:] = 0


def ncl_backward_masked(dy, x, offsets, runs, count, chan, slope, block, dx, sums):
    """Backward: ``sums = (sum_dz, sum_dz_xmu)`` over the valid values (``chan = (mean,
    invstd, w, b)``), then ``dx`` on the runs and 0 in the gaps."""
    N, C, _ = x.shape
    mean, invstd, w, b = chan
    for blk in prange((C + block - 1) // block):
        c0 = blk * block
        c1 = min(C, c0 + block)
        coef = block_coefficients(x, mean, invstd, w, b, c0, c1)
        acc = np.zeros((c1 - c0, 2))  # block of C: sums
        for n in range(N):
            for c in range(c0, c1):
                for k in range(offsets[n], offsets[n + 1]):
                    lo, hi = runs[k, 0], runs[k, 1]
                    s1, s2 = _run_grad_sums(dy[n, c, lo:hi], x[n, c, lo:hi], coef[c - c0], slope)
                    acc[c - c0, 0] += s1
                    acc[c - c0, 1] += s2
        finish_block_grads(acc, c0, c1, count, w, invstd, sums, coef)
        for n in range(N):
            for c in range(c0, c1):
                out = dx[n, c]  # L
                done = 0
                for k in range(offsets[n], offsets[n + 1]):
                    lo, hi = runs[k, 0], runs[k, 1]
                    out[done:lo] = 0
                    _run_grad_input(dy[n, c, lo:hi], x[n, c, lo:hi], out[lo:hi], coef[c - c0], slope)
                    done = hi
                out[done:] = 0


# --- ncl with short runs: whole rows x[n, c, :], each value kept or zeroed by the mask (no
# loop remainder per run; the padded values are read, and discarded by a select) ---


@helper
def _selected_sums(seg, valid, shift):
    """``sum(d)``, ``sum(d * d)`` in float64 over the values of ``seg`` where ``valid``, ``d = seg -
    shift`` (block sums in x's dtype, as ``run_sums``)."""
    s1 = 0.0
    s2 = 0.0
    zero = zero_of(seg)
    for k in range(0, seg.shape[0], BLOCK):
        kk = min(k + BLOCK, seg.shape[0])
        blk = seg[k:kk]  # <= BLOCK
        keep = valid[k:kk]  # <= BLOCK
        p1 = zero
        p2 = zero
        for i in range(blk.shape[0]):
            d = blk[i] - shift if keep[i] else zero
            p1 += d
            p2 += d * d
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


def _selected_normalize(xs, keep, ys, cf, slope):
    """``ys = act((xs - m) * a + b)`` where ``keep``, 0 elsewhere."""
    m, a, b = cf[MEAN], cf[SCALE], cf[SHIFT]
    zero = zero_of(xs)
    for i in range(xs.shape[0]):
        z = act((xs[i] - m) * a + b, slope)
        ys[i] = z if keep[i] else zero


def _selected_grad_sums(gs, xs, keep, cf, slope):
    """:func:`loops._run_grad_sums` over the values where ``keep``."""
    m, a, b = cf[MEAN], cf[SCALE], cf[SHIFT]
    zero = zero_of(xs)
    s1 = 0.0
    s2 = 0.0
    for k in range(0, xs.shape[0], BLOCK):
        kk = min(k + BLOCK, xs.shape[0])
        gb = gs[k:kk]  # <= BLOCK
        xb = xs[k:kk]  # <= BLOCK
        vb = keep[k:kk]  # <= BLOCK
        p1 = zero
        p2 = zero
        for i in range(xb.shape[0]):
            g = _dz(gb[i], xb[i], m, a, b, slope) if vb[i] else zero
            d = xb[i] - m if vb[i] else zero
            p1 += g
            p2 += g * d
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


def _selected_grad_input(gs, xs, keep, out, cf, slope):
    """:func:`loops._run_grad_input` where ``keep``, 0 elsewhere."""
    m, k, zb, a, b = cf[MEAN], cf[SCALE], cf[SHIFT], cf[A], cf[B]
    zero = zero_of(xs)
    for i in range(xs.shape[0]):
        v = _dz(gs[i], xs[i], m, k, zb, slope) * k + (xs[i] - m) * a + b
        out[i] = v if keep[i] else zero


def ncl_forward_selected(x, valid, first, count, w, b, eps, slope, block, y, out):
    """:func:`ncl_forward_masked` on whole rows, ``valid[N, L]`` read as a select per value;
    ``first = (n, l)``, the first valid position."""
    N, C, _ = x.shape
    n0, l0 = first
    for blk in prange((C + block - 1) // block):
        c0 = blk * block
        c1 = min(C, c0 + block)
        acc = np.zeros((c1 - c0, 2))  # block of C: shifted sums
        for n in range(N):
            for c in range(c0, c1):
                s1, s2 = _selected_sums(x[n, c], valid[n], x[n0, c, l0])
                acc[c - c0, 0] += s1
                acc[c - c0, 1] += s2
        coef = np.empty((c1 - c0, 3), dtype=x.dtype)  # block of C: MEAN, SCALE, SHIFT
        for c in range(c0, c1):
            m, istd = finish_stats(acc[c - c0, 0], acc[c - c0, 1], count, x[n0, c, l0], eps, out, c)
            coef[c - c0, MEAN], coef[c - c0, SCALE], coef[c - c0, SHIFT] = m, w[c] * istd, b[c]
        for n in range(N):
            for c in range(c0, c1):
                _selected_normalize(x[n, c], valid[n], y[n, c], coef[c - c0], slope)


def ncl_backward_selected(dy, x, valid, count, chan, slope, block, dx, sums):
    """:func:`ncl_backward_masked` on whole rows, ``valid[N, L]`` read as a select per value."""
    N, C, _ = x.shape
    mean, invstd, w, b = chan
    for blk in prange((C + block - 1) // block):
        c0 = blk * block
        c1 = min(C, c0 + block)
        coef = block_coefficients(x, mean, invstd, w, b, c0, c1)
        acc = np.zeros((c1 - c0, 2))  # block of C: sums
        for n in range(N):
            for c in range(c0, c1):
                s1, s2 = _selected_grad_sums(dy[n, c], x[n, c], valid[n], coef[c - c0], slope)
                acc[c - c0, 0] += s1
                acc[c - c0, 1] += s2
        finish_block_grads(acc, c0, c1, count, w, invstd, sums, coef)
        for n in range(N):
            for c in range(c0, c1):
                _selected_grad_input(dy[n, c], x[n, c], valid[n], dx[n, c], coef[c - c0], slope)


# --- nlc: x[R, C] with R = N * L rows, one work item per block of samples ---


def nlc_forward_masked(x, L, offsets, runs, count, w, b, eps, slope, splits, y, out):
    """Training forward on rows of C; statistics and output as :func:`ncl_forward_masked`."""
    R, C = x.shape
    N = R // L
    n0, l0 = first_valid(offsets, runs)
    shift = x[n0 * L + l0].copy()  # C: each channel's first valid value
    part = np.zeros((splits, 2, C))  # splits,2,C: shifted sums per block of samples
    for s in prange(splits):
        s0, s1 = rows(s, splits, N)
        for n in range(s0, s1):
            for k in range(offsets[n], offsets[n + 1]):
                nlc_shifted_sums(x, n * L + runs[k, 0], n * L + runs[k, 1], shift, part[s])
    coef = np.empty((3, C), dtype=x.dtype)  # MEAN, SCALE, SHIFT
    for c in range(C):
        t1, t2 = parts_merged(part, 0, splits, c)
        m, istd = finish_stats(t1, t2, count, shift[c], eps, out, c)
        coef[MEAN, c], coef[SCALE, c], coef[SHIFT, c] = m, w[c] * istd, b[c]
    for s in prange(splits):
        s0, s1 = rows(s, splits, N)
        for n in range(s0, s1):
            done = n * L
            for k in range(offsets[n], offsets[n + 1]):
                lo, hi = n * L + runs[k, 0], n * L + runs[k, 1]
                y[done:lo] = 0
                _nlc_normalize(x, y, lo, hi, coef, slope)
                done = hi
            y[done : (n + 1) * L] = 0


def nlc_backward_masked(dy, x, L, offsets, runs, count, chan, slope, splits, dx, sums):
    """Backward on rows of C; ``chan``, ``sums`` as in :func:`ncl_backward_masked`."""
    R, C = x.shape
    N = R // L
    mean, invstd, w, b = chan
    sum_dy, sum_dy_xmu = sums
    coef = np.empty((5, C), dtype=x.dtype)  # MEAN, SCALE, SHIFT, A, B
    for c in range(C):
        coef[MEAN, c], coef[SCALE, c], coef[SHIFT, c] = mean[c], w[c] * invstd[c], b[c]
    part = np.zeros((splits, 2, C))  # splits,2,C: partial sums per block of samples
    for s in prange(splits):
        s0, s1 = rows(s, splits, N)
        for n in range(s0, s1):
            for k in range(offsets[n], offsets[n + 1]):
                _nlc_grad_sums(dy, x, n * L + runs[k, 0], n * L + runs[k, 1], coef, slope, part[s])
    for c in range(C):
        t1, t2 = parts_merged(part, 0, splits, c)
        sum_dy[c], sum_dy_xmu[c] = t1, t2
        coef[A, c], coef[B, c] = grad_coefficients(t1, t2, count, w[c], invstd[c])
    for s in prange(splits):
        s0, s1 = rows(s, splits, N)
        for n in range(s0, s1):
            done = n * L
            for k in range(offsets[n], offsets[n + 1]):
                lo, hi = n * L + runs[k, 0], n * L + runs[k, 1]
                dx[done:lo] = 0
                _nlc_grad_input(dy, x, dx, lo, hi, coef, slope)
                done = hi
            dx[done : (n + 1) * L] = 0


training = kernel_family(
    {**vars(loops), **globals()},
    helpers=(*loops.TRAINING_HELPERS, _selected_normalize, _selected_grad_sums, _selected_grad_input),
    kernels=(
        ncl_forward_masked,
        ncl_backward_masked,
        ncl_forward_selected,
        ncl_backward_selected,
        nlc_forward_masked,
        nlc_backward_masked,
    ),
)
