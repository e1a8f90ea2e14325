"""What the Numba kernels of ``loops`` and ``residual_loops`` share: compile options, block
sizes, typed constants, the activations' scalar forms, helpers on runs of values, the
finishing of statistics and of gradient coefficients, and the factory that compiles a
kernel once per activation (and per threading mode).

Layouts (C-contiguous NumPy views of the caller's tensor):

* ``ncl``: ``x[N, C, L]``, a channel's values are ``N`` runs of ``L``;
* ``nlc``: ``x[R, C]`` with ``R = N * L`` rows (channels-last, and ``(B, N)``
  input), a channel is a column.

Statistics accumulate ``d = x - shift`` (``shift`` = the channel's first value)
and ``d * d``, one pass, so data far from zero (mean 1e4, std 1) keep their
variance; partial sums over parts of the batch simply add. Sums run in x's
dtype over blocks of at most ``BLOCK`` values (``ROW_BLOCK`` rows for ``nlc``;
SIMD lanes of float32 are twice as many as float64 ones, and each lane adds
only a few dozen values), and the block sums add up in float64.

Per-channel coefficients travel as rows of a ``coef`` array in x's dtype,
``coef[c]`` (``ncl``) or ``coef[:, c]`` (``nlc``), with the columns ``MEAN``,
``SCALE``, ``SHIFT``: ``z = (x - mean) * scale + shift`` (``scale = w * invstd``,
``shift`` the bias), and for the backward also ``A``, ``B``: ``dx = dz * scale +
(x - mean) * a + b``.

Kernels per activation: the activations whose scalar form the loops apply
(``activations.KINDS[name].in_kernel``) are in ``SCALAR_FORMS``, as ``act(z,
slope)`` and ``dact(z, slope)`` in z's dtype (``slope``: LeakyReLU's, a runtime
scalar in x's dtype; ELU's alpha). A loop module writes its activation-dependent helpers and
kernels as plain functions calling the globals ``act``/``dact``;
:func:`kernel_family` copies them with those globals bound to one activation's
forms, so each activation gets its own kernels (its own qualified names, hence
its own entries in Numba's disk cache), with nothing to branch on inside the
loops: the identity keeps its plain loops (``dy * 1`` folds away).

Numba keys its disk cache by a kernel's own source file, not by the files of the
helpers inlined into it: after editing this file, delete the cached ``*.nbi`` and
``*.nbc`` files of the package (``__pycache__``, or ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba.core import types as nbtypes
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

from ...activations import KINDS, Activation

# Reassociation lets LLVM vectorize the float64 reductions; no "nnan"/"ninf":
# NaN and Inf in the input must reach the output as they would in torch. NumPy's error
# model: a division by zero gives inf/NaN, as in torch, instead of a zero test and a raised
# ZeroDivisionError per division (which also keeps a loop that divides from vectorizing).
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
ERROR_MODEL = "numpy"
helper = numba.njit(cache=True, fastmath=FASTMATH, error_model=ERROR_MODEL, inline="always")
COLUMN_BLOCK = 2048  # nlc: channels per block, so the partial sums (in x's dtype) stay in L1
BLOCK = 256  # ncl: values per block sum in x's dtype
ROW_BLOCK = 64  # nlc: rows per block sum in x's dtype
MEAN, SCALE, SHIFT, A, B = range(5)  # the columns of ``coef``


# --- typed constants: 0, 1 and a cast in the dtype of an array or scalar, so float32 stays float32 ---


def zero_of(v):
    """0 in the dtype of ``v`` (an array or a scalar); compiled code only."""
    raise NotImplementedError


def one_of(v):
    """1 in the dtype of ``v`` (an array or a scalar); compiled code only."""
    raise NotImplementedError


def _dtype_of(v):
    return v.dtype if isinstance(v, nbtypes.Array) else v


@overload(zero_of, inline="always")
def _zero_of(v):
    dtype = _dtype_of(v)
    return lambda v: dtype(0)


@overload(one_of, inline="always")
def _one_of(v):
    dtype = _dtype_of(v)
    return lambda v: dtype(1)


# --- exp in the dtype of its argument. float32: Cephes' expf (Cody-Waite reduction to
# |r| <= ln2 / 2, a degree-6 polynomial, 2^k from its exponent bits), in operations LLVM
# vectorizes, as no vector libm is linked here; relative error below 4e-7 on [-87.3, 88.3],
# 0 below (where exp is subnormal) and inf above. float64: libm's exp. ---

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 = hi + lo, hi exact in few bits
_EXP_MAX, _EXP_MIN = 88.3762626647949, -87.33654475  # 2^k stays a normal float32 in between
_EXPF_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


# ``exp_of`` is inlined into the kernels in Numba's IR (so a kernel's other loops compile as
# they do without it: the statistics stay bit for bit those of the identity's kernel built the
# same way; a kernel loaded from Numba's disk cache may round its float32 sums differently
# from one compiled in the running process, within the sums' rounding). Its
# branches then trip a pedantic check of Numba's SSA pass about the variables it renamed
# itself, a warning about Numba's bookkeeping, not the code (tests check every value).
warnings.filterwarnings("ignore", message=r"variable '_exp_of__locals__expf", category=NumbaIRAssumptionWarning)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a bit cast, free in a vector)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return nbtypes.float32(nbtypes.int32), codegen


def exp_of(z):
    """``exp(z)`` in the dtype of ``z``; compiled code only (see above)."""
    raise NotImplementedError


@overload(exp_of, inline="always")
def _exp_of(z):
    if z != nbtypes.float32:
        return lambda z: math.exp(z)
    p0, p1, p2, p3, p4, p5 = (np.float32(p) for p in _EXPF_POLY)
    hi, lo, log2e = np.float32(_LN2_HI), np.float32(_LN2_LO), np.float32(_LOG2E)
    top, bottom = np.float32(_EXP_MAX), np.float32(_EXP_MIN)
    zero, half, one, inf = np.float32(0), np.float32(0.5), np.float32(1), np.float32(np.inf)

    def expf(z):
        x = min(max(z, bottom), top)  # in range for the integer part (NaN: handled below)
        k = np.floor(x * log2e + half)
        r = x - k * hi - k * lo
        p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
        e = (p * r * r + r + one) * _float32_from_bits(np.int32((np.int32(k) + 127) << 23))
        return z if z != z else (inf if z > top else (zero if z < bottom else e))

    return expf


# --- the activations' scalar forms (``slope``: the activation's one parameter, see backend._slope);
# NaN: act(NaN) = NaN; relu'(NaN) = 0, leaky'(NaN) = slope, elu'(NaN) = silu'(NaN) = NaN ---


@helper
def _identity(z, slope):
    return z


@helper
def _identity_grad(z, slope):
    return one_of(z)


@helper
def _relu(z, slope):
    zero = zero_of(z)
    return zero if z <= zero else z


@helper
def _relu_grad(z, slope):
    zero = zero_of(z)
    return one_of(z) if z > zero else zero


@helper
def _leaky_relu(z, slope):
    return z if z > zero_of(z) else z * slope


@helper
def _leaky_relu_grad(z, slope):
    return one_of(z) if z > zero_of(z) else slope


@helper
def _elu(z, alpha):
    return z if z > zero_of(z) else alpha * (exp_of(z) - one_of(z))


@helper
def _elu_grad(z, alpha):
    return one_of(z) if z > zero_of(z) else alpha * exp_of(z)


@helper
def _silu(z, unused):
    return z / (one_of(z) + exp_of(-z))


@helper
def _silu_grad(z, unused):
    one = one_of(z)
    s = one / (one + exp_of(-z))
    return s * (one + z * (one - s))


# name -> (act, dact), for the activations with ``KINDS[name].in_kernel``
SCALAR_FORMS = {
    "identity": (_identity, _identity_grad),
    "relu": (_relu, _relu_grad),
    "leaky_relu": (_leaky_relu, _leaky_relu_grad),
    "elu": (_elu, _elu_grad),
    "silu": (_silu, _silu_grad),
}
assert set(SCALAR_FORMS) == {name for name, kind in KINDS.items() if kind.in_kernel}


# --- runs: 1-D segments of a channel's values (part of x[n, c, :]) ---


@helper
def run_sums(seg, shift):
    """``sum(d)``, ``sum(d*d)`` in float64, ``d = seg - shift`` (``shift`` in x's dtype; block
    sums in x's dtype)."""
    s1 = 0.0
    s2 = 0.0
    for k in range(0, seg.shape[0], BLOCK):
        blk = seg[k : min(k + BLOCK, seg.shape[0])]  # <= BLOCK
        p1 = zero_of(seg)
        p2 = zero_of(seg)
        for i in range(blk.shape[0]):  # a range from 0, so no negative-index checks: vectorizes
            d = blk[i] - shift
            p1 += d
            p2 += d * d
        s1 += np.float64(p1)
        s2 += np.float64(p2)
    return s1, s2


@helper
def ncl_sums(x, c, j0, j1):
    """:func:`run_sums` over channel c's positions j0..j1 of x[N, C, L], shifted by x[0, c, 0]."""
    L = x.shape[2]
    s1 = 0.0
    s2 = 0.0
    for n in range(j0 // L, (j1 + L - 1) // L):
        a1, a2 = run_sums(x[n, c, max(j0 - n * L, 0) : min(j1 - n * L, L)], x[0, c, 0])
        s1 += a1
        s2 += a2
    return s1, s2


@helper
def ncl_block_sums(x, c0, c1):
    """Shifted sums (float64, ``[c - c0, 0 | 1]``) of channels c0..c1 of x[N, C, L], summed image
    by image (runs of ``(c1 - c0) * L`` values in a row)."""
    acc = np.zeros((c1 - c0, 2))  # block of C: shifted sums
    for i in range(x.shape[0]):
        for c in range(c0, c1):
            s1, s2 = run_sums(x[i, c], x[0, c, 0])
            acc[c - c0, 0] += s1
            acc[c - c0, 1] += s2
    return acc


@helper
def nlc_shifted_sums(x, r0, r1, shift, acc):
    """Adds ``d = x - shift`` and ``d * d`` of rows r0..r1 of x[R, C] to ``acc[0]``, ``acc[1]``
    (float64, C), column block by column block; sums of ``ROW_BLOCK`` rows run in x's dtype."""
    C = x.shape[1]
    p = np.empty((2, min(C, COLUMN_BLOCK)), dtype=x.dtype)  # 2,block of C: sums of a few rows
    for c0 in range(0, C, COLUMN_BLOCK):
        c1 = min(c0 + COLUMN_BLOCK, C)
        a1 = acc[0, c0:c1]  # block of C
        a2 = acc[1, c0:c1]  # block of C
        p1 = p[0, : c1 - c0]  # block of C
        p2 = p[1, : c1 - c0]  # block of C
        sh = shift[c0:c1]  # block of C
        for rb in range(r0, r1, ROW_BLOCK):
            p1[:] = 0
            p2[:] = 0
            for r in range(rb, min(rb + ROW_BLOCK, r1)):
                row = x[r, c0:c1]  # block of C
                for j in range(row.shape[0]):  # from 0: no negative-index checks, so it vectorizes
                    d = row[j] - sh[j]
                    p1[j] += d
                    p2[j] += d * d
            for j in range(p1.shape[0]):
                a1[j] += p1[j]
                a2[j] += p2[j]


@helper
def parts_merged(part, first, count, c):
    """Channel c's two sums, added over the ``count`` row blocks from ``first`` of ``part[block,
    0 | 1, c]`` (the nlc kernels' partial sums)."""
    s1 = 0.0
    s2 = 0.0
    for s in range(first, first + count):
        s1 += part[s, 0, c]
        s2 += part[s, 1, c]
    return s1, s2


@helper
def merged(part, c, splits):
    """Channel c's two sums, added over its ``splits`` parts (``part[c * splits + s]``)."""
    s1 = 0.0
    s2 = 0.0
    for s in range(splits):
        s1 += part[c * splits + s, 0]
        s2 += part[c * splits + s, 1]
    return s1, s2


@helper
def rows(s, splits, R):
    """Rows ``[r0, r1)`` of part ``s`` of ``R`` rows cut into ``splits``."""
    return s * R // splits, (s + 1) * R // splits


# --- finishing: per channel, after the sums ---


# Strict IEEE, said explicitly: a callee that does not set ``fastmath`` inherits its caller's,
# and fast-math turns 1 / sqrt into a reciprocal-square-root estimate (off by an ulp).
@numba.njit(cache=True, fastmath=False, error_model=ERROR_MODEL)
def invstd_of(var, eps):
    """``1 / sqrt(var + eps)`` in var's dtype (``eps`` in it too): correctly rounded sqrt, then
    division, as ``torch.rsqrt``; ``inf`` for a zero ``var + eps``."""
    return one_of(var) / np.sqrt(var + eps)


@helper
def finish_stats(s1, s2, n, shift, eps, out, c):
    """Channel c's mean, biased variance and ``invstd`` into ``out = (mean, var, invstd)`` (x's
    dtype) from the float64 sums of ``d = x - shift`` over ``n`` values; returns
    ``(mean, invstd)`` as stored."""
    mean, var, invstd = out
    dm = s1 / n
    mean[c] = np.float64(shift) + dm
    var[c] = max(s2 / n - dm * dm, 0.0)
    invstd[c] = invstd_of(var[c], eps)
    return mean[c], invstd[c]


@helper
def grad_coefficients(s1, s2, count, w, invstd):
    """``(a, b)`` in float64 of ``dx = dz * k + (x - mean) * a + b``, ``k = w * invstd``:
    ``a = -k * invstd^2 * s2 / count`` (through the variance), ``b = -k * s1 / count`` (the mean),
    from ``s1 = sum(dz)``, ``s2 = sum(dz * (x - mean))`` over ``count`` values."""
    istd = np.float64(invstd)
    k = np.float64(w) * istd  # exact for float32; rounded, it is the ``SCALE`` column
    return -k * istd * istd * s2 / count, -k * s1 / count


@helper
def block_coefficients(x, mean, invstd, w, b, c0, c1):
    """``coef`` rows (x's dtype) of channels c0..c1 for a backward: ``MEAN``, ``SCALE``, ``SHIFT``
    set from the per-channel ``mean``, ``invstd``, ``w``, ``b``; ``A``, ``B`` by
    :func:`finish_block_grads`."""
    coef = np.empty((c1 - c0, 5), dtype=x.dtype)  # block of C: MEAN, SCALE, SHIFT, A, B
    for c in range(c0, c1):
        coef[c - c0, MEAN], coef[c - c0, SCALE], coef[c - c0, SHIFT] = mean[c], w[c] * invstd[c], b[c]
    return coef


@helper
def finish_block_grads(acc, c0, c1, count, w, invstd, sums, coef):
    """Channels c0..c1: their float64 sums ``acc[c - c0]`` stored into ``sums = (sum_dz,
    sum_dz_xmu)``, and ``dx``'s coefficients ``A``, ``B`` into ``coef``, over ``count`` values."""
    sum_dy, sum_dy_xmu = sums
    for c in range(c0, c1):
        s1, s2 = acc[c - c0, 0], acc[c - c0, 1]
        sum_dy[c], sum_dy_xmu[c] = s1, s2
        coef[c - c0, A], coef[c - c0, B] = grad_coefficients(s1, s2, count, w[c], invstd[c])


# --- compiling ---


class Kernel(NamedTuple):
    """One kernel's two dispatchers: ``prange`` over Numba's threads, and a serial copy that
    starts none (small tensors, forked children, concurrent callers)."""

    parallel: Callable
    serial: Callable


def _renamed(fn, namespace: dict, name: str):
    """``fn`` with the globals ``namespace``, under the qualified name ``name`` (Numba keys
    its on-disk cache by qualified name and bytecode, not by globals or compile flags)."""
    clone = types.FunctionType(fn.__code__, namespace, name, fn.__defaults__)
    clone.__qualname__ = name
    clone.__doc__ = fn.__doc__
    return clone


def compile_kernel(fn, namespace: dict, name: str) -> Kernel:
    options = {"cache": True, "fastmath": FASTMATH, "error_model": ERROR_MODEL, "nogil": True}
    return Kernel(
        numba.njit(parallel=True, **options)(_renamed(fn, namespace, name)),
        numba.njit(parallel=False, **options)(_renamed(fn, namespace, name + "_serial")),
    )


def kernel_family(module_globals: dict, helpers: tuple, kernels: tuple) -> Callable[[str], types.SimpleNamespace]:
    """``family(name)``: the ``kernels`` (plain functions of a loop module) compiled for the
    activation ``name``, as a namespace of :class:`Kernel` by function name. The module's
    globals ``act``/``dact``, and its ``helpers`` (the functions that call them, directly or
    through one another), are replaced by the activation's own for those copies; so is
    ``KEEPS_MASK`` (whether the activation's backward after a residual reads a sign mask)."""

    @functools.cache
    def family(name: str) -> types.SimpleNamespace:
        act, dact = SCALAR_FORMS[name]
        namespace = dict(module_globals, act=act, dact=dact, KEEPS_MASK=Activation(name).keeps_mask)
        for fn in helpers:  # late binding: each copy finds the others' copies in the namespace
            namespace[fn.__name__] = helper(_renamed(fn, namespace, f"{fn.__name__}_{name}"))
        return types.SimpleNamespace(
            **{fn.__name__: compile_kernel(fn, namespace, f"{fn.__name__}_{name}") for fn in kernels}
        )

    return family
