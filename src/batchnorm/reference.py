"""The batch normalization equations in NumPy float64, written out plainly.

This module is the oracle every kernel and layer is tested against, and the
place to read the mathematics: no performance tricks, a shape comment on each
line. ``C`` is the channel (feature) axis; every other axis is reduced over.
Run it as a script to check the backward against finite differences.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Cache(NamedTuple):
    """What the forward keeps for the backward (and for the running update)."""

    xhat: np.ndarray  # like x: the normalized input
    gamma: np.ndarray  # C
    mean: np.ndarray  # C: batch mean
    var: np.ndarray  # C: biased batch variance
    invstd: np.ndarray  # C: 1 / sqrt(var + eps)
    channel_axis: int


def _reduce_axes(ndim: int, channel_axis: int) -> tuple[int, ...]:
    """Every axis but the channel axis: batch, and height/width/... if any."""
    channel_axis %= ndim
    return tuple(a for a in range(ndim) if a != channel_axis)


def _per_channel(v: np.ndarray, ndim: int, channel_axis: int) -> np.ndarray:
    """Reshape a (C,) vector so it broadcasts along ``channel_axis``."""
    shape = [1] * ndim
    shape[channel_axis % ndim] = v.shape[0]
    return v.reshape(shape)


def batch_stats(x: np.ndarray, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-channel mean and biased variance of a mini-batch, and the count n."""
    x = np.asarray(x, dtype=np.float64)  # B,C,... (or channels-last)
    axes = _reduce_axes(x.ndim, channel_axis)
    n = x.size // x.shape[channel_axis]  # values per channel: B * prod(spatial)
    mean = x.mean(axis=axes)  # C
    xmu = x - _per_channel(mean, x.ndim, channel_axis)  # like x
    var = (xmu * xmu).mean(axis=axes)  # C, biased: divides by n
    return mean, var, n


def forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
    channel_axis: int = 1,
) -> tuple[np.ndarray, Cache]:
    """Training-mode forward: normalize with the batch's own statistics.

    Args:
        x: ``(B, N)``, ``(B, C, L)``, ``(B, C, H, W)``, ``(B, C, D, H, W)``, or
            any of those with the channel last (``channel_axis=-1``).
        gamma, beta: ``(C,)`` learned scale and shift.
        eps: added to the variance before the square root.

    Returns:
        ``y`` like ``x`` and the cache for :func:`backward`.
    """
    x = np.asarray(x, dtype=np.float64)  # B,C,...
    gamma = np.asarray(gamma, dtype=np.float64)  # C
    beta = np.asarray(beta, dtype=np.float64)  # C
    mean, var, _ = batch_stats(x, channel_axis)  # C, C
    invstd = 1.0 / np.sqrt(var + eps)  # C
    xmu = x - _per_channel(mean, x.ndim, channel_axis)  # like x
    xhat = xmu * _per_channel(invstd, x.ndim, channel_axis)  # like x: zero mean, unit var
    y = xhat * _per_channel(gamma, x.ndim, channel_axis) + _per_channel(beta, x.ndim, channel_axis)  # like x
    return y, Cache(xhat, gamma, mean, var, invstd, channel_axis)


def backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the training forward: ``(dx, dgamma, dbeta)``.

    ``dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))``: the two
    subtracted terms are the paths through the batch mean and variance.
    """
    dy = np.asarray(dy, dtype=np.float64)  # like x
    xhat, gamma, _, _, invstd, channel_axis = cache
    axes = _reduce_axes(dy.ndim, channel_axis)
    n = dy.size // dy.shape[channel_axis]  # values per channel
    dbeta = dy.sum(axis=axes)  # C
    dgamma = (dy * xhat).sum(axis=axes)  # C
    k = _per_channel(gamma * invstd, dy.ndim, channel_axis)  # 1,C,1,...
    dx = k * (  # like x
        dy
        - _per_channel(dbeta / n, dy.ndim, channel_axis)  # through the mean
        - xhat * _per_channel(dgamma / n, dy.ndim, channel_axis)  # through the variance
    )
    return dx, dgamma, dbeta


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    n: int,
    momentum: float | None,
    num_batches_tracked: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One step of the population-statistics estimate, as torch does it.

    ``momentum`` is the weight of the *new* batch (torch's convention, 0.1 by
    default; Keras/Flax call 0.9/0.99 the decay of the old value instead).
    ``momentum=None`` gives the cumulative average over all batches so far.
    The running variance takes the unbiased batch variance, ``var * n/(n-1)``.

    Returns the new ``(running_mean, running_var, num_batches_tracked)``.
    """
    num_batches_tracked = num_batches_tracked + 1
    factor = 1.0 / num_batches_tracked if momentum is None else momentum
    unbiased = np.asarray(var, dtype=np.float64) * n / (n - 1)  # C
    new_mean = (1 - factor) * np.asarray(running_mean, np.float64) + factor * mean  # C
    new_var = (1 - factor) * np.asarray(running_var, np.float64) + factor * unbiased  # C
    return new_mean, new_var, num_batches_tracked


def inference_affine(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Collapse eval-mode normalization, scale and shift to ``y = x * a + b``."""
    a = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(running_var, np.float64) + eps)  # C
    b = np.asarray(beta, np.float64) - np.asarray(running_mean, np.float64) * a  # C
    return a, b


def inference(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """Eval-mode forward: one multiply and one add per element."""
    x = np.asarray(x, dtype=np.float64)  # B,C,...
    return x * _per_channel(scale, x.ndim, channel_axis) + _per_channel(shift, x.ndim, channel_axis)


def _check_against_finite_differences(seed: int = 0) -> float:
    """Largest relative error of backward() against central differences."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 3, 5))  # B,C,L
    gamma, beta = rng.normal(size=3), rng.normal(size=3)  # C, C
    dy = rng.normal(size=x.shape)  # like x
    _, cache = forward(x, gamma, beta)
    dx, dgamma, dbeta = backward(dy, cache)

    def loss(x_, g_, b_):
        return float((forward(x_, g_, b_)[0] * dy).sum())

    worst, h = 0.0, 1e-6
    for arg, analytic in ((0, dx), (1, dgamma), (2, dbeta)):
        args = [x, gamma, beta]
        base = args[arg]
        numeric = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            plus, minus = base.copy(), base.copy()
            plus[i] += h
            minus[i] -= h
            numeric[i] = (
                loss(*[plus if j == arg else a for j, a in enumerate(args)])
                - loss(*[minus if j == arg else a for j, a in enumerate(args)])
            ) / (2 * h)
        worst = max(worst, float(np.abs(numeric - analytic).max() / (np.abs(analytic).max() + 1e-12)))
    return worst


if __name__ == "__main__":
    print(f"backward vs finite differences, max relative error: {_check_against_finite_differences():.2e}")
