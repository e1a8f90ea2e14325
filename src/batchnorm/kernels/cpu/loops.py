"""The Numba kernels of plain batch norm, launched from ``backend``: the training forward
(statistics, and ``y = act(BN(x))`` in the same kernel), the training backward (``dz = dy *
act'(z)`` with ``z`` recomputed from x, both sums of ``dz``, ``dx``) and the eval
``y = act(x * scale + shift [+ r])``; for both layouts of ``_helpers``.

The kernels and the helpers that apply the activation are plain functions here, compiled
once per activation by ``_helpers.kernel_family`` (``act``/``dact`` below are bound to that
activation's scalar forms): ``training(name)`` gives the training kernels,
``evaluation(name)`` the eval ones. The forward writes the ``invstd`` it normalized with;
the backward recomputes ``z`` with ``w * invstd`` from the ``invstd`` it is given, that
same array, so ``act'(z)`` is taken where the forward took ``act(z)``.

Every kernel takes a ``splits`` count chosen by the launcher: the work items (channels x
batch parts, or row blocks) are fixed by it, so results depend on the thread count only
through ``splits`` and are the same run to run.
"""

from __future__ import annotations

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
    finish_stats,
    grad_coefficients,
    kernel_family,
    merged,
    ncl_block_sums,
    ncl_sums,
    nlc_shifted_sums,
    parts_merged,
    rows,
    zero_of,
)

# Bound per activation by ``kernel_family`` (here: the identity's, for reading the code).
act, dact = SCALAR_FORMS["identity"]


# --- helpers that apply the activation (compiled per activation with the kernels) ---


def _dz(g, xv, m, a, b, slope):
    """``dy * act'((x - m) * a + b)``."""
    return g * dact((xv - m) * a + b, slope)


def _run_normalize(xs, ys, cf, slope):
    """``ys = act((xs - m) * a + b)`` on a run, ``(m, a, b)`` the ``MEAN, SCALE, SHIFT`` of ``cf``."""
    m, a, b = cf[MEAN], cf[SCALE], cf[SHIFT]
    for i in range(xs.shape[0]):
        ys[i] = act((xs[i] - m) * a + b, slope)


def _run_grad_sums(gs, xs, cf, slope):
    """``sum(dz)``, ``sum(dz * (x - m))`` in float64 on a run (``dz`` as :func:`_dz` with ``cf``'s
    z coefficients); block sums in x's dtype take ``x - m``, exact near the mean."""
    m, a, b = cf[MEAN], cf[SCALE], cf[SHIFT]
    s1 = 0.0
    s2 = 0.0
    for k in range(0, xs.shape[0], BLOCK):
        kk = min(k + BLOCK, xs.shape[0])
        gb = gs[k:kk]  # <= BLOCK
        xb = xs[k:kk]  # <= BLOCK
        p1 = zero_of(xs)
        p2 = zero_of(xs)
        for i in range(xb.shape[0]):
            g = _dz(gb[i], xb[i], m, a, b, slope)
            p1 += g
            p2 += g * (xb[i] - m)
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


def _run_grad_input(gs, xs, out, cf, slope):
    """``out = dz * k + (x - m) * a + b`` on a run (``k`` z's scale, ``a``, ``b`` from ``cf``)."""
    m, k, zb, a, b = cf[MEAN], cf[SCALE], cf[SHIFT], cf[A], cf[B]
    for i in range(xs.shape[0]):
        out[i] = _dz(gs[i], xs[i], m, k, zb, slope) * k + (xs[i] - m) * a + b


def _ncl_normalize(x, y, c, j0, j1, cf, slope):
    """:func:`_run_normalize` over channel c's positions j0..j1 of x[N, C, L]."""
    L = x.shape[2]
    for n in range(j0 // L, (j1 + L - 1) // L):
        lo, hi = max(j0 - n * L, 0), min(j1 - n * L, L)
        _run_normalize(x[n, c, lo:hi], y[n, c, lo:hi], cf, slope)


def _ncl_grad_sums(dy, x, c, j0, j1, cf, slope):
    """:func:`_run_grad_sums` over channel c's positions j0..j1."""
    L = x.shape[2]
    s1 = 0.0
    s2 = 0.0
    for n in range(j0 // L, (j1 + L - 1) // L):
        lo, hi = max(j0 - n * L, 0), min(j1 - n * L, L)
        a1, a2 = _run_grad_sums(dy[n, c, lo:hi], x[n, c, lo:hi], cf, slope)
        s1 += a1
        s2 += a2
    return s1, s2


def _ncl_grad_input(dy, x, dx, c, j0, j1, cf, slope):
    """:func:`_run_grad_input` over channel c's positions j0..j1."""
    L = x.shape[2]
    for n in range(j0 // L, (j1 + L - 1) // L):
        lo, hi = max(j0 - n * L, 0), min(j1 - n * L, L)
        _run_grad_input(dy[n, c, lo:hi], x[n, c, lo:hi], dx[n, c, lo:hi], cf, slope)


def _nlc_normalize(x, y, r0, r1, coef, slope):
    """``y = act((x - m) * a + b)`` on rows r0..r1 of x[R, C] (``coef[MEAN | SCALE | SHIFT]``)."""
    C = x.shape[1]
    m, a, b = coef[MEAN], coef[SCALE], coef[SHIFT]  # C, C, C
    for r in range(r0, r1):
        xr = x[r]  # C
        yr = y[r]  # C
        for c in range(C):
            yr[c] = act((xr[c] - m[c]) * a[c] + b[c], slope)


def _nlc_grad_sums(dy, x, r0, r1, coef, slope, acc):
    """Adds ``dz`` and ``dz * (x - m)`` of rows r0..r1 to ``acc[0]``, ``acc[1]`` (float64, C), column
    block by column block; sums of ``ROW_BLOCK`` rows run in x's dtype."""
    C = x.shape[1]
    p = np.empty((2, min(C, COLUMN_BLOCK)), dtype=x.dtype)  # 2,block of C: sums of a few rows
    for c0 in range(0, C, COLUMN_BLOCK):
        c1 = min(c0 + COLUMN_BLOCK, C)
        a1 = acc[0, c0:c1]  # block of C
        a2 = acc[1, c0:c1]  # block of C
        mx = coef[MEAN, c0:c1]  # block of C
        af = coef[SCALE, c0:c1]  # block of C
        bf = coef[SHIFT, c0:c1]  # block of C
        p1 = p[0, : c1 - c0]  # block of C
        p2 = p[1, : c1 - c0]  # block of C
        for rb in range(r0, r1, ROW_BLOCK):
            p1[:] = 0
            p2[:] = 0
            for r in range(rb, min(rb + ROW_BLOCK, r1)):
                gr = dy[r, c0:c1]  # block of C
                xr = x[r, c0:c1]  # block of C
                for j in range(gr.shape[0]):
                    g = _dz(gr[j], xr[j], mx[j], af[j], bf[j], slope)
                    p1[j] += g
                    p2[j] += g * (xr[j] - mx[j])
            for j in range(p1.shape[0]):
                a1[j] += p1[j]
                a2[j] += p2[j]


def _nlc_grad_input(dy, x, dx, r0, r1, coef, slope):
    """``dx = dz * k + (x - m) * a + b`` on rows r0..r1 (per-channel rows of ``coef``)."""
    C = x.shape[1]
    m, k, zb, a, b = coef[MEAN], coef[SCALE], coef[SHIFT], coef[A], coef[B]  # C each
    for r in range(r0, r1):
        gr = dy[r]  # C
        xr = x[r]  # C
        out = dx[r]  # C
        for c in range(C):
            out[c] = _dz(gr[c], xr[c], m[c], k[c], zb[c], slope) * k[c] + (xr[c] - m[c]) * a[c] + b[c]


# --- training kernels, ncl layout ---


def ncl_forward(x, w, b, eps, slope, splits, block, write_y, y, out):
    """Training forward on x[N, C, L]: statistics into ``out = (mean, var, invstd)``, and
    ``y = act(BN(x))`` if ``write_y`` (``eps``, ``slope`` in x's dtype).

    ``splits == 1``: one item per ``block`` channels, normalized right after their
    statistics while the block is still in cache; inside a block the loops run
    image by image over the block's channels, so memory is read in runs of
    ``block * L`` values (short per-channel runs of small images defeat the
    hardware prefetcher). ``splits > 1`` (few channels): each channel's positions
    are cut into ``splits`` parts, summed in parallel, merged.
    """
    N, C, L = x.shape
    n = N * L
    coef = np.empty((C, 3), dtype=x.dtype)  # C: MEAN, SCALE, SHIFT
    if splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            acc = ncl_block_sums(x, c0, c1)  # block of C: shifted sums
            for c in range(c0, c1):
                m, istd = finish_stats(acc[c - c0, 0], acc[c - c0, 1], n, x[0, c, 0], eps, out, c)
                coef[c, MEAN], coef[c, SCALE], coef[c, SHIFT] = m, w[c] * istd, b[c]
            if write_y:
                for i in range(N):
                    for c in range(c0, c1):
                        _run_normalize(x[i, c], y[i, c], coef[c], slope)
    else:
        part = np.empty((C * splits, 2))  # C*splits: shifted sums
        for item in prange(C * splits):
            c = item // splits
            s = item % splits
            part[item, 0], part[item, 1] = ncl_sums(x, c, s * n // splits, (s + 1) * n // splits)
        for c in range(C):
            s1, s2 = merged(part, c, splits)
            m, istd = finish_stats(s1, s2, n, x[0, c, 0], eps, out, c)
            coef[c, MEAN], coef[c, SCALE], coef[c, SHIFT] = m, w[c] * istd, b[c]
        if write_y:
            for item in prange(C * splits):
                c = item // splits
                s = item % splits
                _ncl_normalize(x, y, c, s * n // splits, (s + 1) * n // splits, coef[c], slope)


def ncl_backward(dy, x, chan, slope, count, splits, block, mode, dx, sums):
    """Backward on x[N, C, L] with ``chan = (mean, invstd, w, b)``: ``mode`` 0 the sums only,
    1 the sums then ``dx`` (block in cache), 2 ``dx`` from the given sums. ``sums = (sum_dy,
    sum_dy_xmu)`` are of ``dz = dy * act'(z)``, ``z = (x - mean) * w * invstd + b``, over
    ``count`` values per channel. Work items as in :func:`ncl_forward`."""
    N, C, L = x.shape
    n = N * L
    mean, invstd, w, b = chan
    sum_dy, sum_dy_xmu = sums
    coef = np.empty((C, 5), dtype=x.dtype)  # C: MEAN, SCALE, SHIFT, A, B
    for c in range(C):
        coef[c, MEAN], coef[c, SCALE], coef[c, SHIFT] = mean[c], w[c] * invstd[c], b[c]
    if mode == 2:
        for c in range(C):
            coef[c, A], coef[c, B] = grad_coefficients(sum_dy[c], sum_dy_xmu[c], count, w[c], invstd[c])
    elif splits == 1:
        for blk in prange((C + block - 1) // block):
            c0 = blk * block
            c1 = min(C, c0 + block)
            acc = np.zeros((c1 - c0, 2))  # block of C: partial sums
            for i in range(N):
                for c in range(c0, c1):
                    s1, s2 = _run_grad_sums(dy[i, c], x[i, c], coef[c], slope)
                    acc[c - c0, 0] += s1
                    acc[c - c0, 1] += s2
            for c in range(c0, c1):
                s1, s2 = acc[c - c0, 0], acc[c - c0, 1]
                sum_dy[c], sum_dy_xmu[c] = s1, s2
                coef[c, A], coef[c, B] = grad_coefficients(s1, s2, count, w[c], invstd[c])
            if mode == 1:
                for i in range(N):
                    for c in range(c0, c1):
                        _run_grad_input(dy[i, c], x[i, c], dx[i, c], coef[c], slope)
        return
    else:
        part = np.empty((C * splits, 2))  # C*splits: partial sums
        for item in prange(C * splits):
            c = item // splits
            s = item % splits
            j0 = s * n // splits
            j1 = (s + 1) * n // splits
            part[item, 0], part[item, 1] = _ncl_grad_sums(dy, x, c, j0, j1, coef[c], slope)
        for c in range(C):
            s1, s2 = merged(part, c, splits)
            sum_dy[c], sum_dy_xmu[c] = s1, s2
            coef[c, A], coef[c, B] = grad_coefficients(s1, s2, count, w[c], invstd[c])
    if mode != 0:
        if splits == 1:  # mode 2: image by image over blocks of channels
            for blk in prange((C + block - 1) // block):
                for i in range(N):
                    for c in range(blk * block, min(C, (blk + 1) * block)):
                        _run_grad_input(dy[i, c], x[i, c], dx[i, c], coef[c], slope)
        else:
            for item in prange(C * splits):
                c = item // splits
                s = item % splits
                _ncl_grad_input(dy, x, dx, c, s * n // splits, (s + 1) * n // splits, coef[c], slope)


# --- training kernels, nlc layout (rows of C) ---


def nlc_forward(x, w, b, eps, slope, splits, write_y, y, out):
    """Training forward on x[R, C]: ``splits`` row blocks summed in parallel, merged into
    ``out = (mean, var, invstd)``, then ``y = act(BN(x))`` written block by block (a block
    still in cache is read from there)."""
    R, C = x.shape
    shift = np.empty(C, dtype=x.dtype)  # C: each channel's first value
    for c in range(C):
        shift[c] = x[0, c]
    part = np.zeros((splits, 2, C))  # splits,2,C: shifted sums per row block
    for s in prange(splits):
        r0, r1 = rows(s, splits, R)
        nlc_shifted_sums(x, r0, r1, shift, part[s])
    coef = np.empty((3, C), dtype=x.dtype)  # MEAN, SCALE, SHIFT
    for c in range(C):
        s1, s2 = parts_merged(part, 0, splits, c)
        m, istd = finish_stats(s1, s2, R, shift[c], eps, out, c)
        coef[MEAN, c], coef[SCALE, c], coef[SHIFT, c] = m, w[c] * istd, b[c]
    if write_y:
        for s in prange(splits):
            r0, r1 = rows(s, splits, R)
            _nlc_normalize(x, y, r0, r1, coef, slope)


def nlc_backward(dy, x, chan, slope, count, splits, mode, dx, sums):
    """Backward on x[R, C]; ``chan``, ``mode``, ``sums`` and the activation as in
    :func:`ncl_backward`. The coefficients of ``dx`` are taken from the sums as stored."""
    R, C = x.shape
    mean, invstd, w, b = chan
    sum_dy, sum_dy_xmu = sums
    coef = np.empty((5, C), dtype=x.dtype)  # MEAN, SCALE, SHIFT, A, B
    for c in range(C):
        coef[MEAN, c], coef[SCALE, c], coef[SHIFT, c] = mean[c], w[c] * invstd[c], b[c]
    if mode != 2:
        part = np.zeros((splits, 2, C))  # splits,2,C: partial sums per row block
        for s in prange(splits):
            r0, r1 = rows(s, splits, R)
            _nlc_grad_sums(dy, x, r0, r1, coef, slope, part[s])
        for c in range(C):
            sum_dy[c], sum_dy_xmu[c] = parts_merged(part, 0, splits, c)
    if mode == 0:
        return
    for c in range(C):
        coef[A, c], coef[B, c] = grad_coefficients(sum_dy[c], sum_dy_xmu[c], count, w[c], invstd[c])
    for s in prange(splits):
        r0, r1 = rows(s, splits, R)
        _nlc_grad_input(dy, x, dx, r0, r1, coef, slope)


# --- eval kernels (compiled per activation too; the residual's own copies, as a branch on it
# inside the loop keeps the serial copies from vectorizing) ---


def ncl_apply(x, scale, shift, slope, y, splits):
    """Eval: ``y = act(x * scale[c] + shift[c])`` on x[N, C, L], one pass over ``splits``
    blocks of the N*C rows of L."""
    N, C, L = x.shape
    for s in prange(splits):
        r0, r1 = rows(s, splits, N * C)
        for row in range(r0, r1):
            c = row % C
            xr = x[row // C, c]  # L
            yr = y[row // C, c]  # L
            a = scale[c]
            b = shift[c]
            for i in range(L):
                yr[i] = act(xr[i] * a + b, slope)


def ncl_apply_res(x, scale, shift, r, slope, y, splits):
    """Eval: ``y = act(x * scale[c] + shift[c] + r)`` on x[N, C, L], as :func:`ncl_apply`."""
    N, C, L = x.shape
    for s in prange(splits):
        r0, r1 = rows(s, splits, N * C)
        for row in range(r0, r1):
            c = row % C
            xr = x[row // C, c]  # L
            rr = r[row // C, c]  # L
            yr = y[row // C, c]  # L
            a = scale[c]
            b = shift[c]
            for i in range(L):
                yr[i] = act(xr[i] * a + b + rr[i], slope)


def nlc_apply(x, scale, shift, slope, y, splits):
    """Eval: ``y = act(x * scale + shift)`` on x[R, C], ``splits`` row blocks."""
    R, C = x.shape
    for s in prange(splits):
        r0, r1 = rows(s, splits, R)
        for row in range(r0, r1):
            xr = x[row]  # C
            yr = y[row]  # C
            for c in range(C):
                yr[c] = act(xr[c] * scale[c] + shift[c], slope)


def nlc_apply_res(x, scale, shift, r, slope, y, splits):
    """Eval: ``y = act(x * scale + shift + r)`` on x[R, C], ``splits`` row blocks."""
    R, C = x.shape
    for s in prange(splits):
        r0, r1 = rows(s, splits, R)
        for row in range(r0, r1):
            xr = x[row]  # C
            rr = r[row]  # C
            yr = y[row]  # C
            for c in range(C):
                yr[c] = act(xr[c] * scale[c] + shift[c] + rr[c], slope)


# The helpers that apply the activation (``ghost_loops`` compiles its kernels with them too).
TRAINING_HELPERS = (
    _dz,
    _run_normalize,
    _run_grad_sums,
    _run_grad_input,
    _ncl_normalize,
    _ncl_grad_sums,
    _ncl_grad_input,
    _nlc_normalize,
    _nlc_grad_sums,
    _nlc_grad_input,
)
training = kernel_family(
    globals(), helpers=TRAINING_HELPERS, kernels=(ncl_forward, ncl_backward, nlc_forward, nlc_backward)
)
evaluation = kernel_family(globals(), helpers=(), kernels=(ncl_apply, ncl_apply_res, nlc_apply, nlc_apply_res))
