"""The formulas every torch-side path shares, written once, and the numerical choices
of each backend in one place.

Statistics travel as ``(mean, var, invstd)``: the batch mean, the *biased*
variance (what the running update needs) and ``invstd = 1 / sqrt(var + eps)``
exactly as the forward normalized with; the backward reuses that ``invstd``, so
a recomputed ``z = BN(x)`` has the same sign as the forward's (an activation's
kink agrees) and no value is converted back and forth.

The formulas (``n`` values per channel, ``k = weight * invstd``):

* forward: ``y = x * scale + shift`` with ``scale = k``,
  ``shift = bias - mean * k`` (:func:`affine_from_stats`);
* backward: ``dx = k * (dy - sum(dy)/n - (x - mean) * invstd^2 * sum(dy*(x - mean))/n)``
  = ``dy * k + x * a + b`` with ``a = -k * invstd^2 * sum(dy*(x-mean))/n`` and
  ``b = -k * sum(dy)/n - a * mean`` (:func:`grad_input_coefficients`);
  ``dweight = sum(dy*(x-mean)) * invstd``, ``dbias = sum(dy)``.

The same two formulas live once more in each compiled kernel family (the Numba
loops' ``finish`` helpers, the Triton finalize kernel), which cannot call torch,
and once in ``reference`` (NumPy float64, the oracle).

How each backend computes the statistics:

============  ==============================================================  ==========================
backend       mean / variance                                                  accumulation
============  ==============================================================  ==========================
``torch``     ``torch.var_mean`` (Welford), or ``native_batch_norm``           at least float32
``numba``     shifted sums ``d = x - x[0]``, ``d * d``, one pass              blocks of 64-256 values in
                                                                               x's dtype, then float64
``triton``    Welford per tile, Chan's merge of the tiles                      float32
``sync``      each rank's ``(mean, var, count)``, Chan's merge in one          float64 (the exchange)
              all-gather
``reference`` two passes, ``mean`` then ``mean((x - mean)^2)``                float64
============  ==============================================================  ==========================

Statistics are kept in at least float32 (:func:`stats_dtype`); ``eps`` is
added to the biased variance before the square root, as in torch.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

__all__ = ["affine_from_stats", "grad_input_coefficients", "invstd_of", "stats_dtype", "unbiased"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in at least float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def invstd_of(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)`` for a biased variance."""
    return torch.rsqrt(var + eps)


def unbiased(var: Tensor, count: int | Tensor) -> Tensor:
    """The unbiased variance ``var * n / (n - 1)`` from the biased one over ``count`` values
    (what the running estimate takes, as in torch); ``var`` itself for a single value. A 0-d
    tensor ``count`` (a count only the data knows, under a tool that records ops) stays on the
    device."""
    if isinstance(count, Tensor):
        n = count.to(var.dtype)
        return var * torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
    return var * (count / (count - 1)) if count > 1 else var


def _as(v: Tensor, like: Tensor) -> Tensor:
    return v if v.dtype == like.dtype else v.to(like.dtype)


def affine_from_stats(
    mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` with ``y = x * scale + shift`` equal to
    ``(x - mean) * invstd * weight + bias``; in the statistics' dtype."""
    scale = invstd if weight is None else invstd * _as(weight, invstd)
    if bias is None:
        return scale, -mean * scale
    return scale, torch.addcmul(_as(bias, invstd), mean, scale, value=-1)


def grad_input_coefficients(
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xmu: Tensor,
    count: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(k, a, b)`` with ``dx = dy * k + x * a + b``: the training backward
    through the batch mean and variance, the sums taken over ``count`` values per channel
    (all ranks' for a synchronized layer); in ``invstd``'s dtype."""
    k = invstd if weight is None else invstd * _as(weight, invstd)  # C
    a = -k * invstd * invstd * _as(sum_dy_xmu, invstd) / count  # C: through the variance
    b = -k * _as(sum_dy, invstd) / count - a * _as(mean, invstd)  # C: through the mean
    return k, a, b


def pooled(means: Tensor, variances: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, biased var, total count)`` of ``K`` groups of values merged: rows ``(K, C)`` of
    each group's mean and biased variance, ``(K, 1)`` of its count.

    Chan et al.'s parallel merge: with ``n_k`` values, mean ``m_k`` and biased variance
    ``v_k`` in group ``k`` and ``n = sum n_k``, ``mean = sum n_k m_k / n`` and
    ``var = (sum n_k v_k + sum n_k (m_k - mean)^2) / n``: the spread within each group plus
    the spread of the group means, both around the merged mean (no ``E[x^2] - E[x]^2``
    cancellation). A group with no values weighs zero (its rows may hold anything finite).
    The groups are ranks (SyncBatchNorm), micro-batches or a whole dataset's batches
    (``batchnorm.population``); exact up to the rounding of the dtype the rows are in.
    """
    total = counts.sum(0)  # 1
    weights = counts / total.clamp(min=1)  # K,1: n_k / n
    mean = (weights * means).sum(0)  # C
    var = (weights * (variances + (means - mean) ** 2)).sum(0)  # C
    return mean, var, total
