"""The raw Numba loops behind the ``numba`` backend (launched from ``cpu.py``).

Two layouts, both C-contiguous NumPy views of the caller's tensor:

* ``ncl``: ``x[N, C, L]``, a channel's values are ``N`` runs of ``L``;
* ``nlc``: ``x[R, C]`` with ``R = N * L`` rows (channels-last, and ``(B, N)``
  input), a channel is a column.

Statistics accumulate ``d = x - shift`` (``shift`` = the channel's first value)
and ``d * d``, one pass, so data far from zero (mean 1e4, std 1) keep their
variance; partial sums over parts of the batch simply add. Sums run in x's
dtype over blocks of at most ``_BLOCK`` values (SIMD lanes of float32: twice
the width of float64, and each lane adds only a few dozen values), and the
block sums add up in float64. Every kernel
takes a ``splits`` count chosen by the launcher: the work items (channels x
batch parts, or row blocks) are fixed by it, so results depend on the thread
count only through ``splits`` and are the same run to run.

The training kernels take an activation ``act`` (0 identity, 1 ReLU, 2
LeakyReLU with slope ``alpha``): the forward writes
``act(z)``, the backward uses ``dz = dy * act'(z)`` with ``z = (x - mean) * w *
invstd + bias`` recomputed from x. The branch on ``act`` sits outside the inner
loops (each loop is inlined once per activation, with ``act`` a constant), so
the identity keeps its plain loop. ELU and SiLU are left to the launcher's
composition: without SVML Numba calls a scalar ``exp`` per element, slower than
torch's vectorized activation pass.

Each kernel exists twice, built from the same Python function: ``PARALLEL``
(``prange`` over the items, Numba's threading layer) and ``SERIAL`` (no thread
launch: small tensors, forked children, concurrent callers).
"""

from __future__ import annotations

import types

import numba
import numpy as np
from numba import prange

# Reassociation lets LLVM vectorize the float64 reductions; no "nnan"/"ninf":
# NaN and Inf in the input must reach the output as they would in torch.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
_helper = numba.njit(cache=True, fastmath=_FASTMATH, inline="always")
_COLUMN_BLOCK = 2048  # nlc: channels per block, so the partial sums (in x's dtype) stay in L1
_BLOCK = 256  # ncl: values per block sum in x's dtype
_ROW_BLOCK = 64  # nlc: rows per block sum in x's dtype


# --- activations; ``act`` is a constant where these are inlined, so the branches fold ---


@_helper
def _act(z, act, al, zero, one):
    """``act(z)`` in z's dtype (``zero``, ``one``, ``al`` are scalars of that dtype); NaN stays NaN."""
    if act == 1:
        return zero if z <= zero else z
    if act == 2:
        return z if z > zero else z * al
    return z


@_helper
def _dact(z, act, al, zero, one):
    """``act'(z)``, as ``activations.grad_from_input`` (ReLU' of NaN is 0, LeakyReLU' of NaN the slope)."""
    if act == 1:
        return one if z > zero else zero
    if act == 2:
        return one if z > zero else al
    return one


@_helper
def _dz(g, xv, m, af, bf, act, al, zero, one):
    """``dy * act'((x - m) * af + bf)``; ``dy`` itself for the identity."""
    if act == 0:
        return g
    return g * _dact((xv - m) * af + bf, act, al, zero, one)


@_helper
def _consts(x, alpha):
    """``(alpha, 0, 1)`` as scalars of x's dtype."""
    cst = np.empty(3, dtype=x.dtype)
    cst[0] = alpha
    cst[1] = 0.0
    cst[2] = 1.0
    return cst[0], cst[1], cst[2]


# --- helpers on one run: a 1-D segment of a channel's values (part of x[n, c, :]) ---


@_helper
def _run_sums(seg, shift, zero):
    """``sum(d)``, ``sum(d*d)`` in float64, ``d = seg - shift`` (``shift``, ``zero`` in x's dtype;
    block sums in x's dtype)."""
    s1 = 0.0
    s2 = 0.0
    for k in range(0, seg.shape[0], _BLOCK):
        blk = seg[k : min(k + _BLOCK, seg.shape[0])]  # <= _BLOCK
        p1 = zero
        p2 = zero
        for i in range(blk.shape[0]):  # a range from 0, so no negative-index checks: vectorizes
            d = blk[i] - shift
            p1 += d
            p2 += d * d
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


@_helper
def _run_normalize_loop(xs, ys, m, a, b, act, al, zero, one):
    """``ys = act((xs - m) * a + b)`` (scalars in x's dtype)."""
    for i in range(xs.shape[0]):
        ys[i] = _act((xs[i] - m) * a + b, act, al, zero, one)


@_helper
def _run_normalize(xs, ys, m, a, b, act, al, zero, one):
    """:func:`_run_normalize_loop` with ``act`` made a constant (one loop per activation)."""
    if act == 0:
        _run_normalize_loop(xs, ys, m, a, b, 0, al, zero, one)
    elif act == 1:
        _run_normalize_loop(xs, ys, m, a, b, 1, al, zero, one)
    else:
        _run_normalize_loop(xs, ys, m, a, b, 2, al, zero, one)


@_helper
def _run_grad_sums_loop(gs, xs, m, af, bf, act, al, zero, one):
    """``sum(dz)``, ``sum(dz * (x - m))`` in float64 with ``dz = dy * act'((x - m) * af + bf)``
    (``m`` the saved mean, ``af``, ``bf`` in x's dtype); block sums in x's dtype take ``x - m``,
    exact near the mean."""
    s1 = 0.0
    s2 = 0.0
    for k in range(0, xs.shape[0], _BLOCK):
        kk = min(k + _BLOCK, xs.shape[0])
        gb = gs[k:kk]  # <= _BLOCK
        xb = xs[k:kk]  # <= _BLOCK
        p1 = zero
        p2 = zero
        for i in range(xb.shape[0]):
            g = _dz(gb[i], xb[i], m, af, bf, act, al, zero, one)
            p1 += g
            p2 += g * (xb[i] - m)
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


@_helper
def _run_grad_sums(gs, xs, m, af, bf, act, al, zero, one):
    """:func:`_run_grad_sums_loop` with ``act`` made a constant."""
    if act == 0:
        return _run_grad_sums_loop(gs, xs, m, af, bf, 0, al, zero, one)
    if act == 1:
        return _run_grad_sums_loop(gs, xs, m, af, bf, 1, al, zero, one)
    return _run_grad_sums_loop(gs, xs, m, af, bf, 2, al, zero, one)


@_helper
def _run_grad_input_loop(gs, xs, out, k, m, a, b, af, bf, act, al, zero, one):
    """``out = dz * k + (x - m) * a + b``, ``dz`` as in :func:`_run_grad_sums_loop`."""
    for i in range(xs.shape[0]):
        out[i] = _dz(gs[i], xs[i], m, af, bf, act, al, zero, one) * k + (xs[i] - m) * a + b


@_helper
def _run_grad_input(gs, xs, out, k, m, a, b, af, bf, act, al, zero, one):
    """:func:`_run_grad_input_loop` with ``act`` made a constant."""
    if act == 0:
        _run_grad_input_loop(gs, xs, out, k, m, a, b, af, bf, 0, al, zero, one)
    elif act == 1:
        _run_grad_input_loop(gs, xs, out, k, m, a, b, af, bf, 1, al, zero, one)
    else:
        _run_grad_input_loop(gs, xs, out, k, m, a, b, af, bf, 2, al, zero, one)


# --- the same over a range [j0, j1) of a channel's N*L positions (several runs), ncl layout ---


@_helper
def _ncl_sums(x, c, j0, j1, shift, zero):
    """:func:`_run_sums` over channel c's positions j0..j1."""
    L = x.shape[2]
    s1 = 0.0
    s2 = 0.0
    for n in range(j0 // L, (j1 + L - 1) // L):
        a1, a2 = _run_sums(x[n, c, max(j0 - n * L, 0) : min(j1 - n * L, L)], shift, zero)
        s1 += a1
        s2 += a2
    return s1, s2


@_helper
def _ncl_normalize(x, y, c, j0, j1, m, a, b, act, al, zero, one):
    """:func:`_run_normalize` over channel c's positions j0..j1."""
    L = x.shape[2]
    for n in range(j0 // L, (j1 + L - 1) // L):
        lo, hi = max(j0 - n * L, 0), min(j1 - n * L, L)
        _run_normalize(x[n, c, lo:hi], y[n, c, lo:hi], m, a, b, act, al, zero, one)


@_helper
def _ncl_grad_sums(dy, x, c, j0, j1, m, af, bf, act, al, zero, one):
    """:func:`_run_grad_sums` over channel c's positions j0..j1."""
    L = x.shape[2]
    s1 = 0.0
    s2 = 0.0
    for n in range(j0 // L, (j1 + L - 1) // L):
        lo, hi = max(j0 - n * L, 0), min(j1 - n * L, L)
        a1, a2 = _run_grad_sums(dy[n, c, lo:hi], x[n, c, lo:hi], m, af, bf, act, al, zero, one)
        s1 += a1
        s2 += a2
    return s1, s2


@_helper
def _run_grad_input_at(dy, x, dx, i, c, coef, zc, act, al, zero, one):
    """:func:`_run_grad_input` on the run x[i, c, :], coefficients from ``coef``, ``zc``."""
    _run_grad_input(
        dy[i, c],
        x[i, c],
        dx[i, c],
        coef[c, 0],
        coef[c, 1],
        coef[c, 2],
        coef[c, 3],
        zc[c, 0],
        zc[c, 1],
        act,
        al,
        zero,
        one,
    )


@_helper
def _ncl_grad_input(dy, x, dx, c, j0, j1, coef, zc, act, al, zero, one):
    """:func:`_run_grad_input` over channel c's positions j0..j1, coefficients from ``coef``, ``zc``."""
    L = x.shape[2]
    for n in range(j0 // L, (j1 + L - 1) // L):
        lo, hi = max(j0 - n * L, 0), min(j1 - n * L, L)
        _run_grad_input(
            dy[n, c, lo:hi],
            x[n, c, lo:hi],
            dx[n, c, lo:hi],
            coef[c, 0],
            coef[c, 1],
            coef[c, 2],
            coef[c, 3],
            zc[c, 0],
            zc[c, 1],
            act,
            al,
            zero,
            one,
        )


@_helper
def _in_dtype(x, value):
    """``value`` as a scalar of x's dtype."""
    cst = np.empty(1, dtype=x.dtype)
    cst[0] = value
    return cst[0]


@numba.njit(cache=True)  # strict IEEE arithmetic: fast-math would turn w * (1 / s) into w / s
def _scale(w, var_out, c, ex, one):
    """``w * invstd`` in x's dtype with ``invstd = 1 / sqrt(var + eps)`` from the variance as
    stored (x's dtype, ``ex`` the eps in it): the value the backward gets from
    ``torch.rsqrt(var + eps)`` (correctly rounded sqrt, then division) and multiplies by w. The
    backward recomputes ``z`` with it, so ``act'(z)`` there agrees with ``act(z)`` here."""
    r = np.empty(3, dtype=w.dtype)  # each step rounded to the dtype (NumPy scalars would widen)
    r[0] = np.sqrt(var_out[c] + ex)
    r[1] = one / r[0]
    r[2] = w[c] * r[1]
    return r[2]


@_helper
def _finish_stats(s1, s2, n, shift, ex, one, w, b, coef, mean_out, var_out, c):
    """Mean and biased variance from shifted sums; ``coef[c] = (mean, w*invstd, b)`` in x's dtype
    (``ex``, ``one``: eps and 1 in x's dtype)."""
    dm = s1 / n
    var = max(s2 / n - dm * dm, 0.0)
    mean = shift + dm
    mean_out[c] = mean
    var_out[c] = var
    coef[c, 0] = mean
    coef[c, 1] = _scale(w, var_out, c, ex, one)
    coef[c, 2] = b[c]


@_helper
def _finish_grad(s1, s2, n, mean, invstd, w, coef, sum_dy, sum_dy_xmu, c):
    """``dx = dy * k + (x - mean) * a + b`` with ``k = w * invstd``: the coefficients, in x's dtype.

    ``a = -k * invstd^2 * sum_dy_xmu / n`` (through the variance), ``b = -k * sum_dy / n`` (the mean).
    """
    sum_dy[c] = s1
    sum_dy_xmu[c] = s2
    istd = np.float64(invstd[c])
    k = np.float64(w[c]) * istd
    coef[c, 0] = k
    coef[c, 1] = mean[c]
    coef[c, 2] = -k * istd * istd * s2 / n
    coef[c, 3] = -k * s1 / n


@_helper
def _ncl_block_stats(x, c0, c1, zero, ex, one, w, b, coef, mean_out, var_out):
    """Statistics of channels c0..c1 of x[N, C, L], summed image by image (runs of
    ``(c1 - c0) * L`` values in a row), finished into ``coef``, ``mean_out``, ``var_out``."""
    N, _, L = x.shape
    acc = np.zeros((c1 - c0, 2))  # block of C: shifted sums
    for i in range(N):
        for c in range(c0, c1):
            s1, s2 = _run_sums(x[i, c], x[0, c, 0], zero)
            acc[c - c0, 0] += s1
            acc[c - c0, 1] += s2
    for c in range(c0, c1):
        _finish_stats(
            acc[c - c0, 0], acc[c - c0, 1], N * L, np.float64(x[0, c, 0]), ex, one, w, b, coef, mean_out, var_out, c
        )


@_helper
def _merged(part, c, splits):
    """Channel c's two sums, added over its ``splits`` parts (``part[c * splits + s]``)."""
    s1 = 0.0
    s2 = 0.0
    for s in range(splits):
        s1 += part[c * splits + s, 0]
        s2 += part[c * splits + s, 1]
    return s1, s2


@_helper
def _rows(s, splits, R):
    return s * R // splits, (s + 1) * R // splits


# --- row loops on the nlc layout, rows [r0, r1) ---


@_helper
def _nlc_normalize_loop(x, y, r0, r1, m, a, b, act, al, zero, one):
    """``y = act((x - m) * a + b)`` on rows r0..r1 (per-channel vectors of x's dtype)."""
    C = x.shape[1]
    for r in range(r0, r1):
        xr = x[r]  # C
        yr = y[r]  # C
        for c in range(C):
            yr[c] = _act((xr[c] - m[c]) * a[c] + b[c], act, al, zero, one)


@_helper
def _nlc_normalize(x, y, r0, r1, m, a, b, act, al, zero, one):
    """:func:`_nlc_normalize_loop` with ``act`` made a constant."""
    if act == 0:
        _nlc_normalize_loop(x, y, r0, r1, m, a, b, 0, al, zero, one)
    elif act == 1:
        _nlc_normalize_loop(x, y, r0, r1, m, a, b, 1, al, zero, one)
    else:
        _nlc_normalize_loop(x, y, r0, r1, m, a, b, 2, al, zero, one)


@_helper
def _nlc_grad_sums_loop(dy, x, r0, r1, c0, c1, a1, a2, mb, mx, af, bf, act, al, zero, one):
    """Adds ``dz`` and ``dz * (x - mx)`` of rows r0..r1, channels c0..c1 to ``a1``, ``a2``
    (float64 blocks; ``mx``, ``af``, ``bf`` z's coefficients in x's dtype, ``mx`` the float64
    mean ``mb`` rounded: the caller corrects ``a2`` by ``(mx - mb) * a1``). Sums of
    ``_ROW_BLOCK`` rows run in x's dtype."""
    p = np.empty((2, c1 - c0), dtype=x.dtype)  # 2,block of C
    p1 = p[0]
    p2 = p[1]
    for rb in range(r0, r1, _ROW_BLOCK):
        p1[:] = 0
        p2[:] = 0
        for r in range(rb, min(rb + _ROW_BLOCK, r1)):
            gr = dy[r, c0:c1]  # block of C
            xr = x[r, c0:c1]  # block of C
            for j in range(gr.shape[0]):
                g = _dz(gr[j], xr[j], mx[j], af[j], bf[j], act, al, zero, one)
                p1[j] += g
                p2[j] += g * (xr[j] - mx[j])
        for j in range(p1.shape[0]):
            a1[j] += p1[j]
            a2[j] += p2[j]


@_helper
def _nlc_grad_sums(dy, x, r0, r1, c0, c1, a1, a2, mb, mx, af, bf, act, al, zero, one):
    """:func:`_nlc_grad_sums_loop` with ``act`` made a constant."""
    if act == 0:
        _nlc_grad_sums_loop(dy, x, r0, r1, c0, c1, a1, a2, mb, mx, af, bf, 0, al, zero, one)
    elif act == 1:
        _nlc_grad_sums_loop(dy, x, r0, r1, c0, c1, a1, a2, mb, mx, af, bf, 1, al, zero, one)
    else:
        _nlc_grad_sums_loop(dy, x, r0, r1, c0, c1, a1, a2, mb, mx, af, bf, 2, al, zero, one)


@_helper
def _nlc_grad_input_loop(dy, x, dx, r0, r1, k, m, a, b, af, bf, act, al, zero, one):
    """``dx = dz * k + (x - m) * a + b`` on rows r0..r1 (per-channel vectors of x's dtype)."""
    C = x.shape[1]
    for r in range(r0, r1):
        gr = dy[r]  # C
        xr = x[r]  # C
        out = dx[r]  # C
        for c in range(C):
            out[c] = _dz(gr[c], xr[c], m[c], af[c], bf[c], act, al, zero, one) * k[c] + (xr[c] - m[c]) * a[c] + b[c]


@_helper
def _nlc_grad_input(dy, x, dx, r0, r1, k, m, a, b, af, bf, act, al, zero, one):
    """:func:`_nlc_grad_input_loop` with ``act`` made a constant."""
    if act == 0:
        _nlc_grad_input_loop(dy, x, dx, r0, r1, k, m, a, b, af, bf, 0, al, zero, one)
    elif act == 1:
        _nlc_grad_input_loop(dy, x, dx, r0, r1, k, m, a, b, af, bf, 1, al, zero, one)
    else:
        _nlc_grad_input_loop(dy, x, dx, r0, r1, k, m, a, b, af, bf, 2, al, zero, one)


# --- kernels: ncl layout ---


def ncl_forward(x, w, b, eps, splits, block, write_y, y, mean_out, var_out, act, alpha):
    """Training forward on x[N, C, L]: statistics, and ``y = act(BN(x))`` if ``write_y``.

    ``splits == 1``: one item per ``block`` channels, normalized right after their
    statistics while the block is still in cache; inside a block the loops run
    image by image over the block's channels, so memory is read in runs of
    ``block * L`` values (short per-channel runs of small images defeat the
    hardware prefetcher). ``splits > 1`` (few channels): each channel's positions
    are cut into ``splits`` parts, summed in parallel, merged.
    """
    N, C, L = x.shape
    n = N * L
    coef = np.empty((C, 3), dtype=x.dtype)  # C: mean, scale, shift in x's dtype
    al, zero, one = _consts(x, alpha)
    ex = _in_dtype(x, eps)
    if splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            _ncl_block_stats(x, c0, c1, zero, ex, one, w, b, coef, mean_out, var_out)
            if write_y:
                for i in range(N):
                    for c in range(c0, c1):
                        _run_normalize(x[i, c], y[i, c], coef[c, 0], coef[c, 1], coef[c, 2], act, al, zero, one)
    else:
        part = np.empty((C * splits, 2))  # C*splits: shifted sums
        for item in prange(C * splits):
            c = item // splits
            s = item % splits
            part[item, 0], part[item, 1] = _ncl_sums(x, c, s * n // splits, (s + 1) * n // splits, x[0, c, 0], zero)
        for c in range(C):
            s1, s2 = _merged(part, c, splits)
            _finish_stats(s1, s2, n, np.float64(x[0, c, 0]), ex, one, w, b, coef, mean_out, var_out, c)
        if write_y:
            for item in prange(C * splits):
                c = item // splits
                s = item % splits
                j0 = s * n // splits
                j1 = (s + 1) * n // splits
                _ncl_normalize(x, y, c, j0, j1, coef[c, 0], coef[c, 1], coef[c, 2], act, al, zero, one)


def ncl_backward(dy, x, mean, invstd, w, splits, block, mode, dx, sum_dy, sum_dy_xmu, bias, act, alpha):
    """Backward on x[N, C, L]: ``mode`` 0 sums only, 1 sums then ``dx`` (block in cache),
    2 ``dx`` from the given ``sum_dy``/``sum_dy_xmu``. ``dy`` is taken through the activation
    (``dz = dy * act'(z)``, ``z = (x - mean) * w * invstd + bias``); the sums are of ``dz``.
    Work items as in :func:`ncl_forward`."""
    N, C, L = x.shape
    n = N * L
    coef = np.empty((C, 4), dtype=x.dtype)  # C: k, mean, a, b
    zc = np.empty((C, 2), dtype=x.dtype)  # C: w * invstd, bias (z from x)
    for c in range(C):
        zc[c, 0] = w[c] * invstd[c]
        zc[c, 1] = bias[c]
    al, zero, one = _consts(x, alpha)
    if mode == 2:
        for c in range(C):
            _finish_grad(sum_dy[c], sum_dy_xmu[c], n, mean, invstd, w, coef, sum_dy, sum_dy_xmu, c)
    elif splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            acc = np.zeros((c1 - c0, 2))  # block of C: partial sums
            for i in range(N):
                for c in range(c0, c1):
                    s1, s2 = _run_grad_sums(dy[i, c], x[i, c], mean[c], zc[c, 0], zc[c, 1], act, al, zero, one)
                    acc[c - c0, 0] += s1
                    acc[c - c0, 1] += s2
            for c in range(c0, c1):
                _finish_grad(acc[c - c0, 0], acc[c - c0, 1], n, mean, invstd, w, coef, sum_dy, sum_dy_xmu, c)
            if mode == 1:
                for i in range(N):
                    for c in range(c0, c1):
                        _run_grad_input_at(dy, x, dx, i, c, coef, zc, act, al, zero, one)
        return
    else:
        part = np.empty((C * splits, 2))  # C*splits: partial sums
        for item in prange(C * splits):
            c = item // splits
            s = item % splits
            j0 = s * n // splits
            j1 = (s + 1) * n // splits
            part[item, 0], part[item, 1] = _ncl_grad_sums(
                dy, x, c, j0, j1, mean[c], zc[c, 0], zc[c, 1], act, al, zero, one
            )
        for c in range(C):
            s1, s2 = _merged(part, c, splits)
            _finish_grad(s1, s2, n, mean, invstd, w, coef, sum_dy, sum_dy_xmu, c)
    if mode != 0:
        if splits == 1:  # mode 2: image by image over blocks of channels
            for blk in prange((C + block - 1) // block):
                for i in range(N):
                    for c in range(blk * block, min(C, (blk + 1) * block)):
                        _run_grad_input_at(dy, x, dx, i, c, coef, zc, act, al, zero, one)
        else:
            for item in prange(C * splits):
                c = item // splits
                s = item % splits
                _ncl_grad_input(dy, x, dx, c, s * n // splits, (s + 1) * n // splits, coef, zc, act, al, zero, one)


def ncl_apply(x, scale, shift, y, splits):
    """Eval: ``y = x * scale[c] + shift[c]`` on x[N, C, L], one pass over ``splits``
    blocks of the N*C rows of L."""
    N, C, L = x.shape
    for s in prange(splits):
        r0, r1 = _rows(s, splits, N * C)
        for row in range(r0, r1):
            c = row % C
            xr = x[row // C, c]  # L
            yr = y[row // C, c]  # L
            a = scale[c]
            b = shift[c]
            for i in range(L):
                yr[i] = xr[i] * a + b


# --- kernels: nlc layout (rows of C) ---


def nlc_forward(x, w, b, eps, splits, write_y, y, mean_out, var_out, act, alpha):
    """Training forward on x[R, C]: ``splits`` row blocks summed in parallel, merged,
    then ``y = act(BN(x))`` written block by block (a block still in cache is read from there)."""
    R, C = x.shape
    shift = np.empty(C, dtype=x.dtype)  # C: each channel's first value
    for c in range(C):
        shift[c] = x[0, c]
    part = np.zeros((splits, 2, C))  # splits,2,C: shifted sums per row block
    for s in prange(splits):
        r0, r1 = _rows(s, splits, R)
        p = np.empty((2, min(C, _COLUMN_BLOCK)), dtype=x.dtype)  # 2,block of C: sums of a few rows
        for c0 in range(0, C, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, C)
            a1 = part[s, 0, c0:c1]  # block of C
            a2 = part[s, 1, c0:c1]  # block of C
            p1 = p[0, : c1 - c0]  # block of C
            p2 = p[1, : c1 - c0]  # block of C
            sh = shift[c0:c1]  # block of C
            for rb in range(r0, r1, _ROW_BLOCK):
                p1[:] = 0
                p2[:] = 0
                for r in range(rb, min(rb + _ROW_BLOCK, r1)):
                    row = x[r, c0:c1]  # block of C
                    for j in range(row.shape[0]):  # from 0: no negative-index checks, so it vectorizes
                        d = row[j] - sh[j]
                        p1[j] += d
                        p2[j] += d * d
                for j in range(p1.shape[0]):
                    a1[j] += p1[j]
                    a2[j] += p2[j]
    coef = np.empty((3, C), dtype=x.dtype)  # mean, scale, shift in x's dtype
    ex = _in_dtype(x, eps)
    one = _in_dtype(x, 1.0)
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for s in range(splits):
            s1 += part[s, 0, c]
            s2 += part[s, 1, c]
        dm = s1 / R
        var = max(s2 / R - dm * dm, 0.0)
        mean_out[c] = np.float64(shift[c]) + dm
        var_out[c] = var
        coef[0, c] = np.float64(shift[c]) + dm
        coef[1, c] = _scale(w, var_out, c, ex, one)
        coef[2, c] = b[c]
    if write_y:
        al, zero, one = _consts(x, alpha)
        for s in prange(splits):
            r0, r1 = _rows(s, splits, R)
            _nlc_normalize(x, y, r0, r1, coef[0], coef[1], coef[2], act, al, zero, one)


def nlc_backward(dy, x, mean, invstd, w, splits, mode, dx, sum_dy, sum_dy_xmu, bias, act, alpha):
    """Backward on x[R, C]; ``mode`` and the activation as in :func:`ncl_backward`."""
    R, C = x.shape
    zc = np.empty((3, C), dtype=x.dtype)  # mean, w * invstd, bias (z from x)
    for c in range(C):
        zc[0, c] = mean[c]
        zc[1, c] = w[c] * invstd[c]
        zc[2, c] = bias[c]
    al, zero, one = _consts(x, alpha)
    if mode != 2:
        mean64 = np.empty(C)  # C
        for c in range(C):
            mean64[c] = mean[c]
        part = np.zeros((splits, 2, C))  # splits,2,C: partial sums per row block
        for s in prange(splits):
            r0, r1 = _rows(s, splits, R)
            for c0 in range(0, C, _COLUMN_BLOCK):
                c1 = min(c0 + _COLUMN_BLOCK, C)
                a1 = part[s, 0, c0:c1]  # block of C
                a2 = part[s, 1, c0:c1]  # block of C
                _nlc_grad_sums(
                    dy,
                    x,
                    r0,
                    r1,
                    c0,
                    c1,
                    a1,
                    a2,
                    mean64[c0:c1],
                    zc[0, c0:c1],
                    zc[1, c0:c1],
                    zc[2, c0:c1],
                    act,
                    al,
                    zero,
                    one,
                )
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            for s in range(splits):
                s1 += part[s, 0, c]
                s2 += part[s, 1, c]
            sum_dy[c] = s1
            sum_dy_xmu[c] = s2 + (np.float64(zc[0, c]) - mean64[c]) * s1
    if mode == 0:
        return
    coef = np.empty((4, C), dtype=x.dtype)  # k, mean, a, b
    for c in range(C):
        istd = np.float64(invstd[c])
        k = np.float64(w[c]) * istd
        coef[0, c] = k
        coef[1, c] = mean[c]
        coef[2, c] = -k * istd * istd * np.float64(sum_dy_xmu[c]) / R
        coef[3, c] = -k * np.float64(sum_dy[c]) / R
    for s in prange(splits):
        r0, r1 = _rows(s, splits, R)
        _nlc_grad_input(dy, x, dx, r0, r1, coef[0], coef[1], coef[2], coef[3], zc[1], zc[2], act, al, zero, one)


def nlc_apply(x, scale, shift, y, splits):
    """Eval: ``y = x * scale + shift`` on x[R, C], ``splits`` row blocks."""
    R, C = x.shape
    for s in prange(splits):
        r0, r1 = _rows(s, splits, R)
        for r in range(r0, r1):
            xr = x[r]  # C
            yr = y[r]  # C
            for c in range(C):
                yr[c] = xr[c] * scale[c] + shift[c]


_KERNELS = (ncl_forward, ncl_backward, ncl_apply, nlc_forward, nlc_backward, nlc_apply)


def _compile(fn, parallel: bool):
    """A Numba dispatcher for ``fn``. The serial copy gets its own qualified name,
    hence its own on-disk cache entry (Numba keys its cache by name and bytecode,
    not by the ``parallel`` flag)."""
    if not parallel:
        fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
        fn.__qualname__ = fn.__name__
    return numba.njit(parallel=parallel, cache=True, fastmath=_FASTMATH, nogil=True)(fn)


PARALLEL = types.SimpleNamespace(**{fn.__name__: _compile(fn, True) for fn in _KERNELS})
SERIAL = types.SimpleNamespace(**{fn.__name__: _compile(fn, False) for fn in _KERNELS})
