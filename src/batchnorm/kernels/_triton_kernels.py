"""Raw Triton kernels of the ``triton`` backend; launched from ``triton.py``.

Every kernel sees the input through one 3-D tile ``[BLOCK_N, BLOCK_C, BLOCK_L]``
over the ``(N, C, L)`` view, addressed by strides, so one kernel serves both
layouts without copies: for contiguous ``(N, C, L)`` the tile runs along ``L``
(``BLOCK_C`` small), for channels-last the positions are flattened into ``N``
(``L == 1``) and the tile runs along ``C``. A program owns one block of
channels and a contiguous range of tiles of the ``N x L`` extent (the second
grid axis), so a layer with few channels and many positions still fills the
device; partial results go to a ``(k, S, C)`` float32 workspace and a finalize
kernel merges the ``S`` partials per channel. The ``*_single`` kernels hold a
channel block's whole slice in registers: one read of ``x`` (and ``dy``).

Statistics accumulate in float32, of ``x - x[0, c, 0]`` (so a large mean costs
no precision): a Welford update per lane, then Chan's pairwise merge across
lanes and programs; the single-pass kernels centre exactly in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Counts are not specialized on (no recompiling per layer shape for their
# divisibility); strides and C, L are: the mask along the contiguous axis must be
# known 16-aligned for the loads to vectorize.


@triton.jit
def _chan_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Merge two (mean, sum of squared deviations, count) summaries (Chan et al.)."""
    n = n_a + n_b
    w_b = tl.where(n > 0.0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _lanes(c0, s_n, s_c, s_l, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Offsets of a tile's lanes from the tile's corner, for channel block ``c0``."""
    rn = tl.arange(0, BLOCK_N)[:, None, None]  # BN,1,1
    c = c0 + tl.arange(0, BLOCK_C)[None, :, None]  # 1,BC,1
    rl = tl.arange(0, BLOCK_L)[None, None, :]  # 1,1,BL
    return rn * s_n + c * s_c + rl * s_l  # BN,BC,BL


@triton.jit
def _tile_corner(t, tiles_l, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """First row and column of tile ``t``; tiles run along L, then N."""
    if BLOCK_L == 1:  # L == 1 (channels-last): l0 = 0 visibly, so aligned rows still vectorize
        return t * BLOCK_N, 0
    tn = t // tiles_l
    return tn * BLOCK_N, (t - tn * tiles_l) * BLOCK_L


@triton.jit
def _lane_mask(n_left, c0, C, l_left, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """Which lanes of a tile are inside the tensor (``n_left``/``l_left``: rows/columns from the corner on)."""
    rn = tl.arange(0, BLOCK_N)[:, None, None]
    c = c0 + tl.arange(0, BLOCK_C)[None, :, None]
    rl = tl.arange(0, BLOCK_L)[None, None, :]
    return (rn < n_left) & (c < C) & (rl < l_left)  # BN,BC,BL


@triton.jit
def _reduce_nl(v):
    """``[BN, BC, BL] -> [BC]`` by summation."""
    return tl.sum(tl.sum(v, axis=2), axis=0)


# ---------------------------------------------------------------------------
# split kernels: grid (channel blocks, S), each program a range of tiles


@triton.jit(do_not_specialize=["N", "tiles_l", "tiles_total", "tiles_per_prog", "S"])
def partial_stats(
    x_ptr,  # N,C,L strided
    part_ptr,  # 3,S,C float32: mean of x - x[0, c, 0], m2, count per split
    N, C, L, s_n, s_c, s_l,
    tiles_l, tiles_total, tiles_per_prog, S,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    c0 = tl.program_id(0) * BLOCK_C
    s = tl.program_id(1)
    c1 = c0 + tl.arange(0, BLOCK_C)
    shift = tl.load(x_ptr + c1 * s_c, mask=c1 < C, other=0.0).to(tl.float32)[None, :, None]  # x[0, c, 0]
    mean = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_L], tl.float32)  # per lane, of x - shift
    m2 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_L], tl.float32)
    cnt = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_L], tl.float32)
    lanes = _lanes(c0, s_n, s_c, s_l, BLOCK_N, BLOCK_C, BLOCK_L)
    t0 = s * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, tiles_total)
    for t in range(t0, t1):
        n0, l0 = _tile_corner(t, tiles_l, BLOCK_N, BLOCK_L)
        mask = _lane_mask(N - n0, c0, C, L - l0, BLOCK_N, BLOCK_C, BLOCK_L)
        x = tl.load(x_ptr + (n0 * s_n + l0 * s_l) + lanes, mask=mask, other=0.0).to(tl.float32) - shift
        cnt += mask.to(tl.float32)
        delta = tl.where(mask, x - mean, 0.0)
        mean += delta / tl.maximum(cnt, 1.0)
        m2 += delta * (x - mean)  # zero where masked: delta is
    mean, m2, cnt = tl.reduce((mean, m2, cnt), 2, _chan_merge)  # BN,BC
    mean, m2, cnt = tl.reduce((mean, m2, cnt), 0, _chan_merge)  # BC
    cmask = c1 < C
    out = part_ptr + s * C + c1
    tl.store(out, mean, mask=cmask)
    tl.store(out + S * C, m2, mask=cmask)
    tl.store(out + 2 * S * C, cnt, mask=cmask)


@triton.jit(do_not_specialize=["N", "tiles_l", "tiles_total", "tiles_per_prog", "S"])
def partial_grad(
    dy_ptr,  # N,C,L strided like x
    x_ptr,  # N,C,L strided
    mean_ptr,  # C float32
    part_ptr,  # 2,S,C float32: sum(dy), sum(dy * (x - mean)) per split
    N, C, L, s_n, s_c, s_l, d_n, d_c, d_l,
    tiles_l, tiles_total, tiles_per_prog, S,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    c0 = tl.program_id(0) * BLOCK_C
    s = tl.program_id(1)
    c1 = c0 + tl.arange(0, BLOCK_C)
    mean = tl.load(mean_ptr + c1, mask=c1 < C, other=0.0)[None, :, None]  # 1,BC,1
    sum_dy = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_L], tl.float32)
    sum_dy_xmu = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_L], tl.float32)
    x_lanes = _lanes(c0, s_n, s_c, s_l, BLOCK_N, BLOCK_C, BLOCK_L)
    dy_lanes = _lanes(c0, d_n, d_c, d_l, BLOCK_N, BLOCK_C, BLOCK_L)
    t0 = s * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, tiles_total)
    for t in range(t0, t1):
        n0, l0 = _tile_corner(t, tiles_l, BLOCK_N, BLOCK_L)
        mask = _lane_mask(N - n0, c0, C, L - l0, BLOCK_N, BLOCK_C, BLOCK_L)
        x = tl.load(x_ptr + (n0 * s_n + l0 * s_l) + x_lanes, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + (n0 * d_n + l0 * d_l) + dy_lanes, mask=mask, other=0.0).to(tl.float32)
        sum_dy += dy
        sum_dy_xmu += dy * (x - mean)
    cmask = c1 < C
    out = part_ptr + s * C + c1
    tl.store(out, _reduce_nl(sum_dy), mask=cmask)
    tl.store(out + S * C, _reduce_nl(sum_dy_xmu), mask=cmask)


@triton.jit(do_not_specialize=["N", "tiles_l", "tiles_total", "tiles_per_prog"])
def affine(
    x_ptr,  # N,C,L strided
    dy_ptr,  # N,C,L strided (read only if HAS_DY)
    out_ptr,  # N,C,L strided
    coef_ptr,  # 3,C float32: out = x * coef[0] + coef[1] (+ dy * coef[2])
    N, C, L, s_n, s_c, s_l, d_n, d_c, d_l, o_n, o_c, o_l,
    tiles_l, tiles_total, tiles_per_prog,
    HAS_DY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    c0 = tl.program_id(0) * BLOCK_C
    s = tl.program_id(1)
    c1 = c0 + tl.arange(0, BLOCK_C)
    cmask = c1 < C
    a = tl.load(coef_ptr + c1, mask=cmask, other=0.0)[None, :, None]  # 1,BC,1
    b = tl.load(coef_ptr + C + c1, mask=cmask, other=0.0)[None, :, None]
    k = tl.load(coef_ptr + 2 * C + c1, mask=cmask & HAS_DY, other=0.0)[None, :, None]
    x_lanes = _lanes(c0, s_n, s_c, s_l, BLOCK_N, BLOCK_C, BLOCK_L)
    dy_lanes = _lanes(c0, d_n, d_c, d_l, BLOCK_N, BLOCK_C, BLOCK_L)
    out_lanes = _lanes(c0, o_n, o_c, o_l, BLOCK_N, BLOCK_C, BLOCK_L)
    t0 = s * tiles_per_prog
    t1 = tl.minimum(t0 + tiles_per_prog, tiles_total)
    for t in range(t0, t1):
        n0, l0 = _tile_corner(t, tiles_l, BLOCK_N, BLOCK_L)
        mask = _lane_mask(N - n0, c0, C, L - l0, BLOCK_N, BLOCK_C, BLOCK_L)
        x = tl.load(x_ptr + (n0 * s_n + l0 * s_l) + x_lanes, mask=mask, other=0.0).to(tl.float32)
        y = x * a + b
        if HAS_DY:
            dy = tl.load(dy_ptr + (n0 * d_n + l0 * d_l) + dy_lanes, mask=mask, other=0.0).to(tl.float32)
            y += dy * k
        tl.store(out_ptr + (n0 * o_n + l0 * o_l) + out_lanes, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# finalize kernels: grid (channel blocks,), merge the S partials of each channel


@triton.jit(do_not_specialize=["S", "eps"])
def finalize_stats(
    part_ptr,  # 3,S,C float32 from partial_stats
    x_ptr,  # N,C,L: the shift x[0, c, 0] the partials are relative to
    mean_ptr, var_ptr,  # C float32 out: mean, biased variance
    invstd_ptr,  # C float32 out (if WRITE_COEF): 1 / sqrt(var + eps), as normalized with
    w_ptr, b_ptr,  # C weight, bias (read if HAS_W / HAS_B)
    coef_ptr,  # 3,C float32 out (if WRITE_COEF): scale, shift
    S, C, s_c, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_COEF: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # BC
    cmask = c < C
    mean = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    cnt = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[:, None]  # BS,1
        mask = (s < S) & cmask[None, :]
        p = part_ptr + s * C + c[None, :]
        p_mean = tl.load(p, mask=mask, other=0.0)
        p_m2 = tl.load(p + S * C, mask=mask, other=0.0)
        p_cnt = tl.load(p + 2 * S * C, mask=mask, other=0.0)
        mean, m2, cnt = _chan_merge(mean, m2, cnt, p_mean, p_m2, p_cnt)
    mean, m2, cnt = tl.reduce((mean, m2, cnt), 0, _chan_merge)  # BC
    var = m2 / tl.maximum(cnt, 1.0)
    mean += tl.load(x_ptr + c * s_c, mask=cmask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    if WRITE_COEF:
        invstd = 1.0 / tl.sqrt(var + eps)
        tl.store(invstd_ptr + c, invstd, mask=cmask)
        scale = invstd
        if HAS_W:
            scale *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        shift = -mean * scale
        if HAS_B:
            shift += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        tl.store(coef_ptr + c, scale, mask=cmask)
        tl.store(coef_ptr + C + c, shift, mask=cmask)


@triton.jit(do_not_specialize=["S", "count"])
def finalize_grad(
    part_ptr,  # 2,S,C float32 from partial_grad
    mean_ptr, invstd_ptr, w_ptr,  # C
    sum_dy_ptr, sum_dy_xmu_ptr,  # C float32 out
    coef_ptr,  # 3,C float32 out (if WRITE_COEF): dx = x * coef[0] + coef[1] + dy * coef[2]
    S, C, count,
    HAS_W: tl.constexpr, WRITE_COEF: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # BC
    cmask = c < C
    acc_dy = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    acc_dy_xmu = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)[:, None]  # BS,1
        mask = (s < S) & cmask[None, :]
        p = part_ptr + s * C + c[None, :]
        acc_dy += tl.load(p, mask=mask, other=0.0)
        acc_dy_xmu += tl.load(p + S * C, mask=mask, other=0.0)
    sum_dy = tl.sum(acc_dy, axis=0)  # BC
    sum_dy_xmu = tl.sum(acc_dy_xmu, axis=0)  # BC
    tl.store(sum_dy_ptr + c, sum_dy, mask=cmask)
    tl.store(sum_dy_xmu_ptr + c, sum_dy_xmu, mask=cmask)
    if WRITE_COEF:
        _store_dx_coefficients(coef_ptr, mean_ptr, invstd_ptr, w_ptr, sum_dy, sum_dy_xmu, c, cmask, C, count, HAS_W)


@triton.jit
def _store_dx_coefficients(coef_ptr, mean_ptr, invstd_ptr, w_ptr, sum_dy, sum_dy_xmu, c, cmask, C, count,
                           HAS_W: tl.constexpr):  # fmt: skip
    """``dx = k * (dy - sum_dy/n - (x - mean) * invstd^2 * sum_dy_xmu/n)`` as ``dy*k + x*a + b``."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    k = invstd
    if HAS_W:
        k *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    a = -k * invstd * invstd * sum_dy_xmu / count
    b = -k * sum_dy / count - a * mean
    tl.store(coef_ptr + c, a, mask=cmask)
    tl.store(coef_ptr + C + c, b, mask=cmask)
    tl.store(coef_ptr + 2 * C + c, k, mask=cmask)


# ---------------------------------------------------------------------------
# single-pass kernels: grid (channel blocks,), the whole N x L slice in one tile


@triton.jit(do_not_specialize=["N", "count", "eps"])
def forward_single(
    x_ptr,  # N,C,L strided
    y_ptr,  # N,C,L strided (written if WRITE_Y)
    mean_ptr, var_ptr,  # C float32 out
    invstd_ptr,  # C float32 out (if WRITE_Y): 1 / sqrt(var + eps), as normalized with
    w_ptr, b_ptr,  # C
    N, C, L, s_n, s_c, s_l, o_n, o_c, o_l, count, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, WRITE_Y: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    c0 = tl.program_id(0) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < C
    shift = tl.load(x_ptr + c * s_c, mask=cmask, other=0.0).to(tl.float32)  # x[0, c, 0]
    mask = _lane_mask(N, c0, C, L, BLOCK_N, BLOCK_C, BLOCK_L)
    x = tl.load(x_ptr + _lanes(c0, s_n, s_c, s_l, BLOCK_N, BLOCK_C, BLOCK_L), mask=mask, other=0.0)
    x = tl.where(mask, x.to(tl.float32) - shift[None, :, None], 0.0)  # BN,BC,BL
    mean = _reduce_nl(x) / count  # BC, of x - shift
    xmu = tl.where(mask, x - mean[None, :, None], 0.0)  # two passes over registers: exact centring
    var = _reduce_nl(xmu * xmu) / count  # BC
    mean += shift
    tl.store(mean_ptr + c, mean, mask=cmask)
    tl.store(var_ptr + c, var, mask=cmask)
    if WRITE_Y:
        invstd = 1.0 / tl.sqrt(var + eps)
        tl.store(invstd_ptr + c, invstd, mask=cmask)
        scale = invstd
        if HAS_W:
            scale *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        y = xmu * scale[None, :, None]
        if HAS_B:
            y += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
        out = y_ptr + _lanes(c0, o_n, o_c, o_l, BLOCK_N, BLOCK_C, BLOCK_L)
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N", "count"])
def backward_single(
    dy_ptr, x_ptr,  # N,C,L strided
    dx_ptr,  # N,C,L strided (written if WRITE_DX)
    mean_ptr, invstd_ptr, w_ptr,  # C
    sum_dy_ptr, sum_dy_xmu_ptr,  # C float32 out
    N, C, L, s_n, s_c, s_l, d_n, d_c, d_l, o_n, o_c, o_l, count,
    HAS_W: tl.constexpr, WRITE_DX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    c0 = tl.program_id(0) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < C
    mask = _lane_mask(N, c0, C, L, BLOCK_N, BLOCK_C, BLOCK_L)
    x = tl.load(x_ptr + _lanes(c0, s_n, s_c, s_l, BLOCK_N, BLOCK_C, BLOCK_L), mask=mask, other=0.0)
    x = x.to(tl.float32)  # BN,BC,BL
    dy = tl.load(dy_ptr + _lanes(c0, d_n, d_c, d_l, BLOCK_N, BLOCK_C, BLOCK_L), mask=mask, other=0.0)
    dy = dy.to(tl.float32)  # zero where masked
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)  # BC
    xmu = x - mean[None, :, None]
    sum_dy = _reduce_nl(dy)  # BC
    sum_dy_xmu = _reduce_nl(dy * xmu)  # BC
    tl.store(sum_dy_ptr + c, sum_dy, mask=cmask)
    tl.store(sum_dy_xmu_ptr + c, sum_dy_xmu, mask=cmask)
    if WRITE_DX:
        invstd = tl.load(invstd_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        k = invstd
        if HAS_W:
            k *= tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        proj = invstd * invstd * sum_dy_xmu / count  # BC
        dx = (dy - (sum_dy / count)[None, :, None] - xmu * proj[None, :, None]) * k[None, :, None]
        out = dx_ptr + _lanes(c0, o_n, o_c, o_l, BLOCK_N, BLOCK_C, BLOCK_L)
        tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
