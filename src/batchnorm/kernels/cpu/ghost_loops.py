"""The Numba kernels of ghost batch norm (``virtual_batch_size``): statistics per ghost batch
and channel, ``y = act(BN_ghost(x))``, and its backward, in one launch over all ghosts.

A ghost is a run of ``size`` consecutive samples of the batch (the last one may be
shorter): in the ``ncl`` layout ``x[g * size : (g + 1) * size]``, itself a C-contiguous
``(n, C, L)`` array, in the ``nlc`` layout a range of ``size * L`` rows. The kernels take
the per-channel helpers of ``loops`` (compiled per activation with them, by
``_helpers.kernel_family``) and run them per (ghost, channel block) in ``ncl`` and per
(ghost, row block) in ``nlc``: work items over all ghosts at once, so one parallel region
covers the batch. Statistics and sums are ``[G, C]`` arrays, one row per ghost.

Numba keys its disk cache by this file: after editing ``loops`` or ``_helpers``, delete
the cached ``*.nbi``/``*.nbc`` files (see ``_helpers``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from . import loops
from ._helpers import (
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
    ncl_block_sums,
    nlc_shifted_sums,
    parts_merged,
    rows,
)

# Bound per activation by ``kernel_family``, as in ``loops``.
_run_normalize = loops._run_normalize
_run_grad_sums = loops._run_grad_sums
_run_grad_input = loops._run_grad_input
_nlc_normalize = loops._nlc_normalize
_nlc_grad_sums = loops._nlc_grad_sums
_nlc_grad_input = loops._nlc_grad_input


def ncl_forward_ghosts(x, size, w, b, eps, slope, block, y, out):
    """Training forward on x[N, C, L] in ghosts of ``size`` samples: ``out = (mean, var,
    invstd)``, each ``[G, C]``, and ``y = act(BN_ghost(x))``. One work item per ghost and block
    of ``block`` channels: its sums, then its normalization while the block is in cache."""
    N, C, L = x.shape
    G = (N + size - 1) // size
    blocks = (C + block - 1) // block
    mean, var, invstd = out
    for item in prange(G * blocks):
        g = item // blocks
        c0 = (item % blocks) * block
        c1 = min(C, c0 + block)
        n0, n1 = g * size, min(N, (g + 1) * size)
        xg = x[n0:n1]  # ghost,C,L
        yg = y[n0:n1]  # ghost,C,L
        acc = ncl_block_sums(xg, c0, c1)  # block of C: shifted sums
        coef = np.empty((c1 - c0, 3), dtype=x.dtype)  # block of C: MEAN, SCALE, SHIFT
        for c in range(c0, c1):
            m, istd = finish_stats(acc[c - c0, 0], acc[c - c0, 1], (n1 - n0) * L, xg[0, c, 0], eps,
                                   (mean[g], var[g], invstd[g]), c)  # fmt: skip
            coef[c - c0, MEAN], coef[c - c0, SCALE], coef[c - c0, SHIFT] = m, w[c] * istd, b[c]
        for i in range(n1 - n0):
            for c in range(c0, c1):
                _run_normalize(xg[i, c], yg[i, c], coef[c - c0], slope)


def ncl_backward_ghosts(dy, x, size, chan, slope, block, dx, sums):
    """Backward on x[N, C, L] in ghosts of ``size`` samples, ``chan = (mean, invstd, w, b)``
    (``mean``, ``invstd``: ``[G, C]``): per ghost and channel ``sums = (sum_dz, sum_dz_xmu)``
    (``[G, C]``, over the ghost's values), then ``dx``; work items as the forward's."""
    N, C, L = x.shape
    G = (N + size - 1) // size
    blocks = (C + block - 1) // block
    mean, invstd, w, b = chan
    sum_dy, sum_dy_xmu = sums
    for item in prange(G * blocks):
        g = item // blocks
        c0 = (item % blocks) * block
        c1 = min(C, c0 + block)
        n0, n1 = g * size, min(N, (g + 1) * size)
        xg = x[n0:n1]  # ghost,C,L
        gg = dy[n0:n1]  # ghost,C,L
        dxg = dx[n0:n1]  # ghost,C,L
        coef = block_coefficients(x, mean[g], invstd[g], w, b, c0, c1)
        acc = np.zeros((c1 - c0, 2))  # block of C: sums
        for i in range(n1 - n0):
            for c in range(c0, c1):
                s1, s2 = _run_grad_sums(gg[i, c], xg[i, c], coef[c - c0], slope)
                acc[c - c0, 0] += s1
                acc[c - c0, 1] += s2
        finish_block_grads(acc, c0, c1, (n1 - n0) * L, w, invstd[g], (sum_dy[g], sum_dy_xmu[g]), coef)
        for i in range(n1 - n0):
            for c in range(c0, c1):
                _run_grad_input(gg[i, c], xg[i, c], dxg[i, c], coef[c - c0], slope)


@helper
def _ghost_rows(item, splits, ghost_rows, R):
    """Rows ``[r0, r1)`` of work item ``item``: part ``item % splits`` of ghost ``item // splits``."""
    g0 = (item // splits) * ghost_rows
    r0, r1 = rows(item % splits, splits, min(R, g0 + ghost_rows) - g0)
    return g0 + r0, g0 + r1


def nlc_forward_ghosts(x, ghost_rows, w, b, eps, slope, splits, y, out):
    """Training forward on x[R, C] in ghosts of ``ghost_rows`` rows (``size * L``): each ghost's
    rows cut into ``splits`` blocks summed in parallel, merged into ``out = (mean, var, invstd)``
    (``[G, C]``), then ``y = act(BN_ghost(x))`` block by block."""
    R, C = x.shape
    G = (R + ghost_rows - 1) // ghost_rows
    mean, var, invstd = out
    shift = np.empty((G, C), dtype=x.dtype)  # G,C: each ghost's first row
    for g in range(G):
        for c in range(C):
            shift[g, c] = x[g * ghost_rows, c]
    part = np.zeros((G * splits, 2, C))  # G*splits,2,C: shifted sums per row block
    for item in prange(G * splits):
        r0, r1 = _ghost_rows(item, splits, ghost_rows, R)
        nlc_shifted_sums(x, r0, r1, shift[item // splits], part[item])
    coef = np.empty((G, 3, C), dtype=x.dtype)  # G: MEAN, SCALE, SHIFT
    for g in range(G):
        count = min(R, (g + 1) * ghost_rows) - g * ghost_rows
        for c in range(C):
            s1, s2 = parts_merged(part, g * splits, splits, c)
            m, istd = finish_stats(s1, s2, count, shift[g, c], eps, (mean[g], var[g], invstd[g]), c)
            coef[g, MEAN, c], coef[g, SCALE, c], coef[g, SHIFT, c] = m, w[c] * istd, b[c]
    for item in prange(G * splits):
        r0, r1 = _ghost_rows(item, splits, ghost_rows, R)
        _nlc_normalize(x, y, r0, r1, coef[item // splits], slope)


def nlc_backward_ghosts(dy, x, ghost_rows, chan, slope, splits, dx, sums):
    """Backward on x[R, C] in ghosts of ``ghost_rows`` rows; ``chan`` and ``sums`` as in
    :func:`ncl_backward_ghosts`, work items as in :func:`nlc_forward_ghosts`."""
    R, C = x.shape
    G = (R + ghost_rows - 1) // ghost_rows
    mean, invstd, w, b = chan
    sum_dy, sum_dy_xmu = sums
    coef = np.empty((G, 5, C), dtype=x.dtype)  # G: MEAN, SCALE, SHIFT, A, B
    for g in range(G):
        for c in range(C):
            coef[g, MEAN, c], coef[g, SCALE, c], coef[g, SHIFT, c] = mean[g, c], w[c] * invstd[g, c], b[c]
    part = np.zeros((G * splits, 2, C))  # G*splits,2,C: partial sums per row block
    for item in prange(G * splits):
        r0, r1 = _ghost_rows(item, splits, ghost_rows, R)
        _nlc_grad_sums(dy, x, r0, r1, coef[item // splits], slope, part[item])
    for g in range(G):
        count = min(R, (g + 1) * ghost_rows) - g * ghost_rows
        for c in range(C):
            s1, s2 = parts_merged(part, g * splits, splits, c)
            sum_dy[g, c], sum_dy_xmu[g, c] = s1, s2
            coef[g, A, c], coef[g, B, c] = grad_coefficients(s1, s2, count, w[c], invstd[g, c])
    for item in prange(G * splits):
        r0, r1 = _ghost_rows(item, splits, ghost_rows, R)
        _nlc_grad_input(dy, x, dx, r0, r1, coef[item // splits], slope)


training = kernel_family(
    {**vars(loops), **globals()},
    helpers=loops.TRAINING_HELPERS,
    kernels=(ncl_forward_ghosts, ncl_backward_ghosts, nlc_forward_ghosts, nlc_backward_ghosts),
)
