"""The Numba kernels of ``act(BN(x) + residual)``, launched from ``backend``; layouts and
conventions as in ``_helpers``.

The residual is added before the activation, so ``z`` cannot be recomputed from ``x`` in
the backward: the forward keeps the sign of ``z`` as a bit mask (``sign_mask``: for
``ncl`` a ``uint8[N, C, ceil(L / 8)]`` array, bit ``l % 8`` of byte ``l // 8`` of row
``(n, c)``; for ``nlc`` a ``uint8[R, ceil(C / 8)]`` array, bit ``c % 8`` of byte ``c // 8``
of row ``r``), and the backward takes ``dz = dy * act'(z)`` from it: 1 where the bit is
set, else the activation's slope below zero (0 for ReLU; NaN counts as not positive, as in
``activations``). Each row starts on its own byte, so work items never share a byte: a
batch split of a channel is cut at a multiple of 8 within the row (:func:`cut`).

The forward kernels are compiled per activation (``forward(name)``, see
``_helpers.kernel_family``); for the identity (``KEEPS_MASK`` false) they take a mask of
zero width and write none. The backward kernels (``BACKWARD``) read the slope as a
runtime scalar, so one copy serves every activation with a mask.

Packing stays vectorizable: the main loop writes one 0/1 byte per element into a small
scratch row, then eight of those bytes, read as one 64-bit word, become one mask byte
with a multiply (``(v * 0x0102040810204080) >> 56`` gathers the eight low bits).
Unpacking is a 256-entry table from a mask byte to eight 0/1 bytes.
"""

from __future__ import annotations

import types

import numpy as np
from numba import prange

from ._helpers import (
    BLOCK,
    COLUMN_BLOCK,
    MEAN,
    ROW_BLOCK,
    SCALAR_FORMS,
    SCALE,
    SHIFT,
    A,
    B,
    compile_kernel,
    finish_stats,
    grad_coefficients,
    helper,
    kernel_family,
    merged,
    ncl_block_sums,
    ncl_sums,
    one_of,
    rows,
    zero_of,
)

_GATHER = np.uint64(0x0102040810204080)
_TOP_BYTE = np.uint64(56)
# byte b -> the 8 bytes (b >> t) & 1, t = 0..7, as one little-endian 64-bit word
_SPREAD = np.array([sum(((b >> t) & 1) << (8 * t) for t in range(8)) for b in range(256)], dtype=np.uint64)

# Bound per activation by ``kernel_family`` (here: the identity's, for reading the code).
act, dact = SCALAR_FORMS["identity"]
KEEPS_MASK = False


# --- the bit mask ---


@helper
def pack(scratch, k, out):
    """The ``k`` 0/1 bytes at the start of ``scratch`` (64-bit words, written as bytes) as bits
    into ``out[: ceil(k / 8)]`` (bytes past ``k`` in the last word are cleared first)."""
    flags = scratch.view(np.uint8)
    for i in range(k, ((k + 7) >> 3) << 3):
        flags[i] = 0
    for q in range((k + 7) >> 3):
        out[q] = np.uint8((scratch[q] * _GATHER) >> _TOP_BYTE)


@helper
def unpack(bits, k, scratch):
    """The first ``k`` bits of ``bits`` as 0/1 bytes at the start of ``scratch`` (64-bit words),
    returned as a byte view."""
    for q in range((k + 7) >> 3):
        scratch[q] = _SPREAD[bits[q]]
    return scratch.view(np.uint8)


@helper
def cut(s, splits, n, L):
    """Start of part ``s`` of a channel's ``n = N * L`` positions, rounded down to a multiple
    of 8 within its row (so parts never share a mask byte)."""
    j = s * n // splits
    return j - (j % L) % 8


@helper
def _masked_dz(g, bit, slope):
    """``dy * act'``: ``dy`` where the bit is set, else ``dy * slope``."""
    return g * (one_of(g) if bit != 0 else slope)


# --- forward, compiled per activation ---


def _run_normalize_res(xs, rs, ys, bits, cf, slope, scratch):
    """``ys = act((xs - m) * a + b + rs)`` on a run that starts on a byte of its mask row (``m, a,
    b`` the ``MEAN, SCALE, SHIFT`` of ``cf``), and the sign bits of the argument into ``bits``."""
    flags = scratch.view(np.uint8)
    m, a, b = cf[MEAN], cf[SCALE], cf[SHIFT]
    for i in range(xs.shape[0]):
        z = (xs[i] - m) * a + b + rs[i]
        ys[i] = act(z, slope)
        flags[i] = z > zero_of(z)
    if KEEPS_MASK:
        pack(scratch, xs.shape[0], bits)


def ncl_forward_res(x, r, w, b, eps, slope, splits, block, y, mk, out):
    """Training forward on x[N, C, L]: statistics into ``out = (mean, var, invstd)``, ``y =
    act(BN(x) + r)`` and the sign mask ``mk``. Work items as ``loops.ncl_forward``."""
    N, C, L = x.shape
    n = N * L
    coef = np.empty((C, 3), dtype=x.dtype)  # C: MEAN, SCALE, SHIFT
    words = (L + 7) // 8
    if splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            scratch = np.empty(words, dtype=np.uint64)  # flags of one run
            acc = ncl_block_sums(x, c0, c1)  # block of C: shifted sums
            for c in range(c0, c1):
                m, istd = finish_stats(acc[c - c0, 0], acc[c - c0, 1], n, x[0, c, 0], eps, out, c)
                coef[c, MEAN], coef[c, SCALE], coef[c, SHIFT] = m, w[c] * istd, b[c]
            for i in range(N):
                for c in range(c0, c1):
                    _run_normalize_res(x[i, c], r[i, c], y[i, c], mk[i, c], coef[c], slope, scratch)
        return
    part = np.empty((C * splits, 2))  # C*splits: shifted sums
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        part[item, 0], part[item, 1] = ncl_sums(x, c, s * n // splits, (s + 1) * n // splits)
    for c in range(C):
        s1, s2 = merged(part, c, splits)
        m, istd = finish_stats(s1, s2, n, x[0, c, 0], eps, out, c)
        coef[c, MEAN], coef[c, SCALE], coef[c, SHIFT] = m, w[c] * istd, b[c]
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        scratch = np.empty(words, dtype=np.uint64)
        j0 = cut(s, splits, n, L)
        j1 = cut(s + 1, splits, n, L)
        for i in range(j0 // L, (j1 + L - 1) // L):
            lo, hi = max(j0 - i * L, 0), min(j1 - i * L, L)
            xs, rs, ys = x[i, c, lo:hi], r[i, c, lo:hi], y[i, c, lo:hi]
            _run_normalize_res(xs, rs, ys, mk[i, c, lo >> 3 :], coef[c], slope, scratch)


def nlc_apply_res(x, r, y, mk, coef, slope, splits):
    """``y = act((x - m) * a + b + r)`` on x[R, C] (``coef[MEAN | SCALE | SHIFT]``) and the sign
    mask, ``splits`` row blocks; the statistics come from ``loops.nlc_forward``."""
    R, C = x.shape
    m, a, b = coef[MEAN], coef[SCALE], coef[SHIFT]  # C, C, C
    for s in prange(splits):
        r0, r1 = rows(s, splits, R)
        scratch = np.empty((C + 7) // 8, dtype=np.uint64)  # flags of one row
        flags = scratch.view(np.uint8)
        for row in range(r0, r1):
            xr = x[row]  # C
            rr = r[row]  # C
            yr = y[row]  # C
            for c in range(C):
                z = (xr[c] - m[c]) * a[c] + b[c] + rr[c]
                yr[c] = act(z, slope)
                flags[c] = z > zero_of(z)
            if KEEPS_MASK:
                pack(scratch, C, mk[row])


# --- backward, from the mask (one copy for every activation) ---


@helper
def _run_masked_sums(gs, xs, bits, m, slope, scratch):
    """``sum(dz)``, ``sum(dz * (x - m))`` in float64 on a run starting on a byte of its mask row
    (``dz`` as :func:`_masked_dz`); block sums in x's dtype."""
    flags = unpack(bits, xs.shape[0], scratch)
    s1 = 0.0
    s2 = 0.0
    for k in range(0, xs.shape[0], BLOCK):
        kk = min(k + BLOCK, xs.shape[0])
        gb = gs[k:kk]  # <= BLOCK
        xb = xs[k:kk]  # <= BLOCK
        fb = flags[k:kk]  # <= BLOCK
        p1 = zero_of(xs)
        p2 = zero_of(xs)
        for i in range(xb.shape[0]):
            g = _masked_dz(gb[i], fb[i], slope)
            p1 += g
            p2 += g * (xb[i] - m)
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


@helper
def _run_masked_grad_input(gs, xs, bits, dx, dr, cf, slope, scratch):
    """``dr = dz``, ``dx = dz * k + (x - m) * a + b`` on a run (``cf``: ``MEAN``, ``SCALE`` = k,
    ``A``, ``B``)."""
    flags = unpack(bits, xs.shape[0], scratch)
    m, k, a, b = cf[MEAN], cf[SCALE], cf[A], cf[B]
    for i in range(xs.shape[0]):
        g = _masked_dz(gs[i], flags[i], slope)
        dr[i] = g
        dx[i] = g * k + (xs[i] - m) * a + b


def ncl_backward_res(dy, x, mk, chan, slope, count, splits, block, dx, dr, sums):
    """Backward of ``act(BN(x) + r)`` on x[N, C, L] from the sign mask, ``chan = (mean, invstd,
    w)``: ``dr = dz``, ``dx`` and ``sums = (sum(dz), sum(dz * (x - mean)))`` over ``count``
    values per channel (``slope``: act' where the bit is clear)."""
    N, C, L = x.shape
    n = N * L
    mean, invstd, w = chan
    sum_dy, sum_dy_xmu = sums
    words = (L + 7) // 8
    coef = np.zeros((C, 5), dtype=x.dtype)  # C: MEAN, SCALE, (SHIFT: 0), A, B
    for c in range(C):
        coef[c, MEAN], coef[c, SCALE] = mean[c], w[c] * invstd[c]
    if splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            scratch = np.empty(words, dtype=np.uint64)
            acc = np.zeros((c1 - c0, 2))  # block of C: partial sums
            for i in range(N):
                for c in range(c0, c1):
                    s1, s2 = _run_masked_sums(dy[i, c], x[i, c], mk[i, c], mean[c], slope, scratch)
                    acc[c - c0, 0] += s1
                    acc[c - c0, 1] += s2
            for c in range(c0, c1):
                s1, s2 = acc[c - c0, 0], acc[c - c0, 1]
                sum_dy[c], sum_dy_xmu[c] = s1, s2
                coef[c, A], coef[c, B] = grad_coefficients(s1, s2, count, w[c], invstd[c])
            for i in range(N):
                for c in range(c0, c1):
                    _run_masked_grad_input(dy[i, c], x[i, c], mk[i, c], dx[i, c], dr[i, c], coef[c], slope, scratch)
        return
    part = np.empty((C * splits, 2))  # C*splits: partial sums
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        scratch = np.empty(words, dtype=np.uint64)
        j0 = cut(s, splits, n, L)
        j1 = cut(s + 1, splits, n, L)
        s1 = 0.0
        s2 = 0.0
        for i in range(j0 // L, (j1 + L - 1) // L):
            lo, hi = max(j0 - i * L, 0), min(j1 - i * L, L)
            a1, a2 = _run_masked_sums(dy[i, c, lo:hi], x[i, c, lo:hi], mk[i, c, lo >> 3 :], mean[c], slope, scratch)
            s1 += a1
            s2 += a2
        part[item, 0], part[item, 1] = s1, s2
    for c in range(C):
        s1, s2 = merged(part, c, splits)
        sum_dy[c], sum_dy_xmu[c] = s1, s2
        coef[c, A], coef[c, B] = grad_coefficients(s1, s2, count, w[c], invstd[c])
    for item in prange(C * splits):
        c = item // splits
        s = item % splits
        scratch = np.empty(words, dtype=np.uint64)
        j0 = cut(s, splits, n, L)
        j1 = cut(s + 1, splits, n, L)
        for i in range(j0 // L, (j1 + L - 1) // L):
            lo, hi = max(j0 - i * L, 0), min(j1 - i * L, L)
            gs, xs, bits = dy[i, c, lo:hi], x[i, c, lo:hi], mk[i, c, lo >> 3 :]
            _run_masked_grad_input(gs, xs, bits, dx[i, c, lo:hi], dr[i, c, lo:hi], coef[c], slope, scratch)


def nlc_backward_res(dy, x, mk, chan, slope, count, splits, dx, dr, sums):
    """Backward of ``act(BN(x) + r)`` on x[R, C] from the sign mask, as :func:`ncl_backward_res`."""
    R, C = x.shape
    mean, invstd, w = chan
    sum_dy, sum_dy_xmu = sums
    part = np.zeros((splits, 2, C))  # splits,2,C: partial sums per row block
    for s in prange(splits):
        r0, r1 = rows(s, splits, R)
        scratch = np.empty((C + 7) // 8, dtype=np.uint64)
        p = np.empty((2, min(C, COLUMN_BLOCK)), dtype=x.dtype)  # 2,block of C
        for c0 in range(0, C, COLUMN_BLOCK):
            c1 = min(c0 + COLUMN_BLOCK, C)
            p1 = p[0, : c1 - c0]  # block of C
            p2 = p[1, : c1 - c0]  # block of C
            mx = mean[c0:c1]  # block of C
            for rb in range(r0, r1, ROW_BLOCK):
                p1[:] = 0
                p2[:] = 0
                for row in range(rb, min(rb + ROW_BLOCK, r1)):
                    flags = unpack(mk[row, c0 >> 3 :], c1 - c0, scratch)
                    gr = dy[row, c0:c1]  # block of C
                    xr = x[row, c0:c1]  # block of C
                    for j in range(gr.shape[0]):
                        g = _masked_dz(gr[j], flags[j], slope)
                        p1[j] += g
                        p2[j] += g * (xr[j] - mx[j])
                for j in range(p1.shape[0]):
                    part[s, 0, c0 + j] += p1[j]
                    part[s, 1, c0 + j] += p2[j]
    coef = np.empty((5, C), dtype=x.dtype)  # MEAN, SCALE, (SHIFT), A, B
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for s in range(splits):
            s1 += part[s, 0, c]
            s2 += part[s, 1, c]
        sum_dy[c], sum_dy_xmu[c] = s1, s2
        coef[MEAN, c], coef[SCALE, c] = mean[c], w[c] * invstd[c]
        coef[A, c], coef[B, c] = grad_coefficients(s1, s2, count, w[c], invstd[c])
    for s in prange(splits):
        r0, r1 = rows(s, splits, R)
        scratch = np.empty((C + 7) // 8, dtype=np.uint64)
        m, k, a, b = coef[MEAN], coef[SCALE], coef[A], coef[B]  # C each
        for row in range(r0, r1):
            flags = unpack(mk[row], C, scratch)
            gr = dy[row]  # C
            xr = x[row]  # C
            outx = dx[row]  # C
            outr = dr[row]  # C
            for c in range(C):
                g = _masked_dz(gr[c], flags[c], slope)
                outr[c] = g
                outx[c] = g * k[c] + (xr[c] - m[c]) * a[c] + b[c]


forward = kernel_family(globals(), helpers=(_run_normalize_res,), kernels=(ncl_forward_res, nlc_apply_res))
BACKWARD = types.SimpleNamespace(
    **{fn.__name__: compile_kernel(fn, globals(), fn.__name__) for fn in (ncl_backward_res, nlc_backward_res)}
)
