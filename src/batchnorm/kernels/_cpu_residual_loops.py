"""The Numba loops for ``act(BN(x) + residual)`` (launched from ``cpu.py``).

Same layouts and conventions as ``_cpu_loops`` (``ncl``: ``x[N, C, L]``;
``nlc``: ``x[R, C]``). The residual is added before the activation, so ``z`` can
no longer be recomputed from ``x`` in the backward: the forward keeps the sign
of ``z`` as a bit mask, one bit per element, and the backward takes
``dz = dy * act'(z)`` from it (1 where ``z > 0``, else 0 for ReLU or the slope
for LeakyReLU; NaN counts as not positive, as in ``activations``).

The bit mask (see ``sign_mask``): for ``ncl`` a ``uint8[N, C, ceil(L / 8)]``
array, bit ``l % 8`` of byte ``l // 8`` of row ``(n, c)``; for ``nlc`` a
``uint8[R, ceil(C / 8)]`` array, bit ``c % 8`` of byte ``c // 8`` of row ``r``.
Each row starts on its own byte, so work items never share a byte: a batch split
of a channel is cut at a multiple of 8 within the row (``_cut``).

Packing stays vectorizable: the main loop writes one 0/1 byte per element into a
small scratch row, then eight of those bytes, read as one 64-bit word, become one
mask byte with a multiply (``(v * 0x0102040810204080) >> 56`` gathers the eight
low bits). Unpacking is a 256-entry table from a mask byte to eight 0/1 bytes.
"""

from __future__ import annotations

import types

import numpy as np
from numba import prange

from ._cpu_loops import (
    _BLOCK,
    _COLUMN_BLOCK,
    _ROW_BLOCK,
    _act,
    _compile,
    _consts,
    _finish_grad,
    _finish_stats,
    _helper,
    _in_dtype,
    _merged,
    _ncl_block_stats,
    _ncl_sums,
    _rows,
)

_GATHER = np.uint64(0x0102040810204080)
_SHIFT = np.uint64(56)
# byte b -> the 8 bytes (b >> t) & 1, t = 0..7, as one little-endian 64-bit word
_SPREAD = np.array([sum(((b >> t) & 1) << (8 * t) for t in range(8)) for b in range(256)], dtype=np.uint64)


@_helper
def _pack(flags64, flags8, k, out):
    """Bits of the ``k`` 0/1 bytes ``flags8[:k]`` into ``out[: ceil(k / 8)]`` (``flags64`` the same
    scratch as 64-bit words; bytes past ``k`` in the last word are cleared first)."""
    for i in range(k, ((k + 7) >> 3) << 3):
        flags8[i] = 0
    for q in range((k + 7) >> 3):
        out[q] = np.uint8((flags64[q] * _GATHER) >> _SHIFT)


@_helper
def _unpack(bits, nbytes, flags64):
    """``nbytes`` mask bytes into 0/1 bytes (``flags64`` viewed as bytes)."""
    for q in range(nbytes):
        flags64[q] = _SPREAD[bits[q]]


@_helper
def _cut(s, splits, n, L):
    """Start of part ``s`` of a channel's ``n = N * L`` positions, rounded down to a multiple
    of 8 within its row (so parts never share a mask byte)."""
    j = s * n // splits
    return j - (j % L) % 8


# --- ncl ---


@_helper
def _run_normalize_res_loop(x, r, y, mk, n, c, lo, hi, m, a, b, act, al, zero, f64, f8):
    """``y = act((x - m) * a + b + r)`` on the run x[n, c, lo:hi] (lo a multiple of 8), and the
    sign bits of the argument into ``mk`` (not for the identity)."""
    xs = x[n, c, lo:hi]  # <= L
    rs = r[n, c, lo:hi]  # <= L
    ys = y[n, c, lo:hi]  # <= L
    for i in range(xs.shape[0]):
        z = (xs[i] - m) * a + b + rs[i]
        ys[i] = _act(z, act, al, zero, zero)
        f8[i] = z > zero
    if act != 0:
        _pack(f64, f8, hi - lo, mk[n, c, lo >> 3 :])


@_helper
def _run_normalize_res(x, r, y, mk, n, c, lo, hi, m, a, b, act, al, zero, f64, f8):
    """:func:`_run_normalize_res_loop` with ``act`` made a constant."""
    if act == 0:
        _run_normalize_res_loop(x, r, y, mk, n, c, lo, hi, m, a, b, 0, al, zero, f64, f8)
    elif act == 1:
        _run_normalize_res_loop(x, r, y, mk, n, c, lo, hi, m, a, b, 1, al, zero, f64, f8)
    else:
        _run_normalize_res_loop(x, r, y, mk, n, c, lo, hi, m, a, b, 2, al, zero, f64, f8)


@_helper
def _run_masked_sums(dy, x, mk, n, c, lo, hi, m, al, zero, one, f64, f8):
    """``sum(dz)``, ``sum(dz * (x - m))`` in float64 on the run x[n, c, lo:hi], with ``dz = dy``
    where the mask bit is set, else ``dy * al``; block sums in x's dtype."""
    _unpack(mk[n, c, lo >> 3 :], (hi - lo + 7) >> 3, f64)
    s1 = 0.0
    s2 = 0.0
    for k in range(lo, hi, _BLOCK):
        kk = min(k + _BLOCK, hi)
        gs = dy[n, c, k:kk]  # <= _BLOCK
        xs = x[n, c, k:kk]  # <= _BLOCK
        fs = f8[k - lo : kk - lo]  # <= _BLOCK
        p1 = zero
        p2 = zero
        for i in range(xs.shape[0]):
            g = gs[i] * (one if fs[i] != 0 else al)
            p1 += g
            p2 += g * (xs[i] - m)
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


@_helper
def _run_masked_grad_input(dy, x, mk, dx, dr, n, c, lo, hi, coef, al, one, f64, f8):
    """``dr = dz``, ``dx = dz * k + (x - m) * a + b`` on the run x[n, c, lo:hi] (``coef[c]``:
    k, m, a, b)."""
    _unpack(mk[n, c, lo >> 3 :], (hi - lo + 7) >> 3, f64)
    k, m, a, b = coef[c, 0], coef[c, 1], coef[c, 2], coef[c, 3]
    gs = dy[n, c, lo:hi]  # <= L
    xs = x[n, c, lo:hi]  # <= L
    outx = dx[n, c, lo:hi]  # <= L
    outr = dr[n, c, lo:hi]  # <= L
    for i in range(xs.shape[0]):
        g = gs[i] * (one if f8[i] != 0 else al)
        outr[i] = g
        outx[i] = g * k + (xs[i] - m) * a + b


@_helper
def _ncl_normalize_res(x, r, y, mk, c, j0, j1, m, a, b, act, al, zero, f64, f8):
    """:func:`_run_normalize_res` over channel c's positions j0..j1 (j0 on a byte of its row)."""
    L = x.shape[2]
    for n in range(j0 // L, (j1 + L - 1) // L):
        _run_normalize_res(x, r, y, mk, n, c, max(j0 - n * L, 0), min(j1 - n * L, L), m, a, b, act, al, zero, f64, f8)


@_helper
def _ncl_masked_sums(dy, x, mk, c, j0, j1, m, al, zero, one, f64, f8):
    """:func:`_run_masked_sums` over channel c's positions j0..j1."""
    L = x.shape[2]
    s1 = 0.0
    s2 = 0.0
    for n in range(j0 // L, (j1 + L - 1) // L):
        a1, a2 = _run_masked_sums(dy, x, mk, n, c, max(j0 - n * L, 0), min(j1 - n * L, L), m, al, zero, one, f64, f8)
        s1 += a1
        s2 += a2
    return s1, s2


@_helper
def _ncl_masked_grad_input(dy, x, mk, dx, dr, c, j0, j1, coef, al, one, f64, f8):
    """:func:`_run_masked_grad_input` over channel c's positions j0..j1."""
    L = x.shape[2]
    for n in range(j0 // L, (j1 + L - 1) // L):
        _run_masked_grad_input(dy, x, mk, dx, dr, n, c, max(j0 - n * L, 0), min(j1 - n * L, L), coef, al, one, f64, f8)


def ncl_forward_res(x, r, w, b, eps, splits, block, y, mk, mean_out, var_out, act, alpha):
    """Training forward on x[N, C, L]: statistics, ``y = act(BN(x) + r)`` and the sign mask
    ``mk`` (``act`` 1 or 2; for 0 the mask is left alone). Work items as ``ncl_forward``."""
    N, C, L = x.shape
    n = N * L
    coef = np.empty((C, 3), dtype=x.dtype)  # C: mean, scale, shift in x's dtype
    al, zero, one = _consts(x, alpha)
    ex = _in_dtype(x, eps)
    words = (L + 7) // 8
    if splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            f64 = np.empty(words, dtype=np.uint64)  # scratch flags of one row
            f8 = f64.view(np.uint8)
            _ncl_block_stats(x, c0, c1, zero, ex, one, w, b, coef, mean_out, var_out)
            for i in range(N):
                for c in range(c0, c1):
                    _run_normalize_res(
                        x, r, y, mk, i, c, 0, L, coef[c, 0], coef[c, 1], coef[c, 2], act, al, zero, f64, f8
                    )
        return
    part = np.empty((C * splits, 2))  # C*splits: shifted sums
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        part[item, 0], part[item, 1] = _ncl_sums(x, c, s * n // splits, (s + 1) * n // splits, x[0, c, 0], zero)
    for c in range(C):
        s1, s2 = _merged(part, c, splits)
        _finish_stats(s1, s2, n, np.float64(x[0, c, 0]), ex, one, w, b, coef, mean_out, var_out, c)
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        f64 = np.empty(words, dtype=np.uint64)
        f8 = f64.view(np.uint8)
        j0 = _cut(s, splits, n, L)
        j1 = _cut(s + 1, splits, n, L)
        _ncl_normalize_res(x, r, y, mk, c, j0, j1, coef[c, 0], coef[c, 1], coef[c, 2], act, al, zero, f64, f8)


def ncl_backward_res(dy, x, mk, mean, invstd, w, splits, block, dx, dr, sum_dy, sum_dy_xmu, alpha):
    """Backward of ``act(BN(x) + r)`` on x[N, C, L] from the sign mask: ``dr = dz``, ``dx`` and
    the sums of ``dz`` (``alpha``: act' where the bit is clear, 0 for ReLU)."""
    N, C, L = x.shape
    n = N * L
    al, zero, one = _consts(x, alpha)
    words = (L + 7) // 8
    coef = np.empty((C, 4), dtype=x.dtype)  # C: k, mean, a, b
    if splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            f64 = np.empty(words, dtype=np.uint64)
            f8 = f64.view(np.uint8)
            acc = np.zeros((c1 - c0, 2))  # block of C: partial sums
            for i in range(N):
                for c in range(c0, c1):
                    s1, s2 = _run_masked_sums(dy, x, mk, i, c, 0, L, mean[c], al, zero, one, f64, f8)
                    acc[c - c0, 0] += s1
                    acc[c - c0, 1] += s2
            for c in range(c0, c1):
                _finish_grad(acc[c - c0, 0], acc[c - c0, 1], n, mean, invstd, w, coef, sum_dy, sum_dy_xmu, c)
            for i in range(N):
                for c in range(c0, c1):
                    _run_masked_grad_input(dy, x, mk, dx, dr, i, c, 0, L, coef, al, one, f64, f8)
        return
    part = np.empty((C * splits, 2))  # C*splits: partial sums
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        f64 = np.empty(words, dtype=np.uint64)
        f8 = f64.view(np.uint8)
        j0 = _cut(s, splits, n, L)
        j1 = _cut(s + 1, splits, n, L)
        part[item, 0], part[item, 1] = _ncl_masked_sums(dy, x, mk, c, j0, j1, mean[c], al, zero, one, f64, f8)
    for c in range(C):
        s1, s2 = _merged(part, c, splits)
        _finish_grad(s1, s2, n, mean, invstd, w, coef, sum_dy, sum_dy_xmu, c)
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        f64 = np.empty(words, dtype=np.uint64)
        f8 = f64.view(np.uint8)
        j0 = _cut(s, splits, n, L)
        j1 = _cut(s + 1, splits, n, L)
        _ncl_masked_grad_input(dy, x, mk, dx, dr, c, j0, j1, coef, al, one, f64, f8)


# --- nlc (rows of C) ---


def nlc_apply_res(x, r, y, mk, m, a, b, splits, act, alpha):
    """``y = act((x - m) * a + b + r)`` on x[R, C] (per-channel vectors in x's dtype) and the
    sign mask (``act`` 1 or 2), ``splits`` row blocks; the statistics come from ``nlc_forward``."""
    R, C = x.shape
    al, zero, _ = _consts(x, alpha)
    for s in prange(splits):
        r0, r1 = _rows(s, splits, R)
        f64 = np.empty((C + 7) // 8, dtype=np.uint64)
        f8 = f64.view(np.uint8)
        if act == 1:
            _nlc_apply_res_rows(x, r, y, mk, r0, r1, m, a, b, 1, al, zero, f64, f8)
        elif act == 2:
            _nlc_apply_res_rows(x, r, y, mk, r0, r1, m, a, b, 2, al, zero, f64, f8)
        else:
            _nlc_apply_res_rows(x, r, y, mk, r0, r1, m, a, b, 0, al, zero, f64, f8)


@_helper
def _nlc_apply_res_rows(x, r, y, mk, r0, r1, m, a, b, act, al, zero, f64, f8):
    C = x.shape[1]
    for row in range(r0, r1):
        xr = x[row]  # C
        rr = r[row]  # C
        yr = y[row]  # C
        for c in range(C):
            z = (xr[c] - m[c]) * a[c] + b[c] + rr[c]
            yr[c] = _act(z, act, al, zero, zero)
            f8[c] = z > zero
        if act != 0:
            _pack(f64, f8, C, mk[row])


def nlc_backward_res(dy, x, mk, mean, invstd, w, splits, dx, dr, sum_dy, sum_dy_xmu, alpha):
    """Backward of ``act(BN(x) + r)`` on x[R, C] from the sign mask, as :func:`ncl_backward_res`."""
    R, C = x.shape
    al, _, one = _consts(x, alpha)
    part = np.zeros((splits, 2, C))  # splits,2,C: partial sums per row block
    for s in prange(splits):
        r0, r1 = _rows(s, splits, R)
        f64 = np.empty((C + 7) // 8, dtype=np.uint64)
        f8 = f64.view(np.uint8)
        p = np.empty((2, min(C, _COLUMN_BLOCK)), dtype=x.dtype)  # 2,block of C
        for c0 in range(0, C, _COLUMN_BLOCK):
            c1 = min(c0 + _COLUMN_BLOCK, C)
            p1 = p[0, : c1 - c0]  # block of C
            p2 = p[1, : c1 - c0]  # block of C
            mx = mean[c0:c1]  # block of C
            for rb in range(r0, r1, _ROW_BLOCK):
                p1[:] = 0
                p2[:] = 0
                for row in range(rb, min(rb + _ROW_BLOCK, r1)):
                    _unpack(mk[row, c0 >> 3 :], (c1 - c0 + 7) >> 3, f64)
                    gr = dy[row, c0:c1]  # block of C
                    xr = x[row, c0:c1]  # block of C
                    for j in range(gr.shape[0]):
                        g = gr[j] * (one if f8[j] != 0 else al)
                        p1[j] += g
                        p2[j] += g * (xr[j] - mx[j])
                for j in range(p1.shape[0]):
                    part[s, 0, c0 + j] += p1[j]
                    part[s, 1, c0 + j] += p2[j]
    coef = np.empty((4, C), dtype=x.dtype)  # k, mean, a, b
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for s in range(splits):
            s1 += part[s, 0, c]
            s2 += part[s, 1, c]
        sum_dy[c] = s1
        sum_dy_xmu[c] = s2
        istd = np.float64(invstd[c])
        k = np.float64(w[c]) * istd
        coef[0, c] = k
        coef[1, c] = mean[c]
        coef[2, c] = -k * istd * istd * s2 / R
        coef[3, c] = -k * s1 / R
    for s in prange(splits):
        r0, r1 = _rows(s, splits, R)
        f64 = np.empty((C + 7) // 8, dtype=np.uint64)
        f8 = f64.view(np.uint8)
        for row in range(r0, r1):
            _unpack(mk[row], (C + 7) >> 3, f64)
            gr = dy[row]  # C
            xr = x[row]  # C
            outx = dx[row]  # C
            outr = dr[row]  # C
            for c in range(C):
                g = gr[c] * (one if f8[c] != 0 else al)
                outr[c] = g
                outx[c] = g * coef[0, c] + (xr[c] - coef[1, c]) * coef[2, c] + coef[3, c]


_KERNELS = (ncl_forward_res, ncl_backward_res, nlc_apply_res, nlc_backward_res)

PARALLEL = types.SimpleNamespace(**{fn.__name__: _compile(fn, True) for fn in _KERNELS})
SERIAL = types.SimpleNamespace(**{fn.__name__: _compile(fn, False) for fn in _KERNELS})
