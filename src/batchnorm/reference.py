"""The batch normalization equations in NumPy float64, written out plainly.

This module is the oracle every kernel and layer is tested against, and the
place to read the mathematics: no performance tricks, a shape comment on each
line. ``C`` is the channel (feature) axis; every other axis is reduced over.
Beside the plain normalization it has the fused form ``y = act(BN(x) + residual)``
and the memory-saving backward that sees only ``y``.
Run it as a script to check the backwards against finite differences.
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


ACTIVATIONS = ("identity", "relu", "leaky_relu", "elu", "silu")


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def activation_forward(z: np.ndarray, name: str, param: float = 0.0) -> np.ndarray:
    """``act(z)`` elementwise, as torch defines each activation.

    * ``identity``: ``z``
    * ``relu``: ``max(z, 0)``
    * ``leaky_relu``: ``z`` for ``z > 0``, else ``param * z`` (``param``: the negative slope)
    * ``elu``: ``z`` for ``z > 0``, else ``param * (exp(z) - 1)`` (``param``: alpha)
    * ``silu``: ``z * sigmoid(z)`` (``param`` unused)
    """
    _check_activation(name)
    z = np.asarray(z, dtype=np.float64)  # like x
    if name == "relu":
        return np.where(z > 0, z, 0.0)  # like x
    if name == "leaky_relu":
        return np.where(z > 0, z, param * z)  # like x
    if name == "elu":
        negative = np.minimum(z, 0.0)  # like x: exp only where it is used, so it cannot overflow
        return np.where(z > 0, z, param * np.expm1(negative))  # like x
    if name == "silu":
        return z / (1.0 + np.exp(-z))  # like x: z * sigmoid(z)
    return z.copy()  # like x: identity


def activation_grad(z: np.ndarray, name: str, param: float = 0.0) -> np.ndarray:
    """``act'(z)`` elementwise, with torch's choice at the kink ``z = 0``.

    * ``identity``: ``1``
    * ``relu``: ``1`` for ``z > 0``, else ``0`` (so ``relu'(0) = 0``)
    * ``leaky_relu``: ``1`` for ``z > 0``, else ``param`` (so ``leaky_relu'(0) = param``)
    * ``elu``: ``1`` for ``z > 0``, else ``param * exp(z)`` (so ``elu'(0) = param``)
    * ``silu``: ``s * (1 + z * (1 - s))`` with ``s = sigmoid(z)``
    """
    _check_activation(name)
    z = np.asarray(z, dtype=np.float64)  # like x
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)  # like x
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, param)  # like x
    if name == "elu":
        negative = np.minimum(z, 0.0)  # like x
        return np.where(z > 0, 1.0, param * np.exp(negative))  # like x
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))  # like x: sigmoid(z)
        return s * (1.0 + z * (1.0 - s))  # like x
    return np.ones_like(z)  # like x: identity


def _invert_activation(y: np.ndarray, name: str, param: float) -> tuple[np.ndarray, np.ndarray]:
    """``z`` with ``act(z) = y`` and ``act'(z)`` read from ``y``, for the invertible activations.

    * ``identity``: ``z = y``, ``act' = 1``
    * ``leaky_relu`` (slope > 0): ``z = y / slope`` where ``y <= 0``; ``act' = slope`` there
    * ``elu`` (alpha > 0): ``z = log(1 + y / alpha)`` where ``y <= 0``; ``act' = alpha * exp(z) = y + alpha`` there
    """
    _check_activation(name)
    y = np.asarray(y, dtype=np.float64)  # like x
    if name == "identity":
        return y.copy(), np.ones_like(y)  # like x, like x
    if name == "leaky_relu" and param > 0:
        z = np.where(y > 0, y, y / param)  # like x
        return z, np.where(y > 0, 1.0, param)  # like x, like x
    if name == "elu" and param > 0:
        negative = np.minimum(y, 0.0)  # like x: log1p only where it is used
        z = np.where(y > 0, y, np.log1p(negative / param))  # like x
        return z, np.where(y > 0, 1.0, y + param)  # like x, like x
    raise ValueError(
        f"the output alone determines the input only for an invertible activation (identity, leaky_relu "
        f"with a positive slope, elu with a positive alpha); got {name} with parameter {param}"
    )


class FusedCache(NamedTuple):
    """What :func:`fused_forward` keeps for :func:`fused_backward`."""

    bn: Cache  # the plain normalization's cache
    z: np.ndarray  # like x: BN(x) + residual, the activation's input
    activation: str
    param: float
    has_residual: bool


def fused_forward(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float = 1e-5,
    residual: np.ndarray | None = None,
    activation: str = "identity",
    param: float = 0.0,
    channel_axis: int = 1,
) -> tuple[np.ndarray, FusedCache]:
    """Training-mode fused forward: ``y = act(BN(x) + residual)``.

    ``BN`` is :func:`forward`; ``residual`` (optional) has ``x``'s shape; ``act``
    is one of :data:`ACTIVATIONS` (see :func:`activation_forward`) with its ``param``.

    Returns:
        ``y`` like ``x`` and the cache for :func:`fused_backward`.
    """
    bn, cache = forward(x, gamma, beta, eps, channel_axis)  # like x
    z = bn  # like x
    if residual is not None:
        z = bn + np.asarray(residual, dtype=np.float64)  # like x
    y = activation_forward(z, activation, param)  # like x
    return y, FusedCache(cache, z, activation, float(param), residual is not None)


def fused_backward(dy: np.ndarray, cache: FusedCache) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of :func:`fused_forward`: ``(dx, dgamma, dbeta, dresidual)``.

    ``dz = dy * act'(z)`` with ``z = BN(x) + residual``; ``dresidual = dz`` (``None``
    without a residual); ``dx, dgamma, dbeta`` are :func:`backward` applied to ``dz``.
    """
    dy = np.asarray(dy, dtype=np.float64)  # like x
    dz = dy * activation_grad(cache.z, cache.activation, cache.param)  # like x
    dx, dgamma, dbeta = backward(dz, cache.bn)  # like x, C, C
    dresidual = dz if cache.has_residual else None  # like x
    return dx, dgamma, dbeta, dresidual


def backward_from_output(
    dy: np.ndarray,
    y: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    var: np.ndarray,
    eps: float,
    activation: str,
    param: float,
    channel_axis: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The memory-saving backward of ``y = act(BN(x))`` from the output alone: ``(dx, dgamma, dbeta)``.

    In-Place Activated BatchNorm (Rota Bulo et al. 2018): for an invertible ``act``
    (identity, leaky_relu with slope > 0, elu with alpha > 0) the input is not needed:
    ``z = act^-1(y)``, ``act'(z)`` from ``y``, ``xhat = (z - beta) / gamma``, and then
    :func:`backward` on ``dz = dy * act'(z)`` with that ``xhat``. ``var`` is the
    forward's biased batch variance. Every ``gamma`` must be non-zero.
    """
    dy = np.asarray(dy, dtype=np.float64)  # like x
    gamma = np.asarray(gamma, dtype=np.float64)  # C
    beta = np.asarray(beta, dtype=np.float64)  # C
    var = np.asarray(var, dtype=np.float64)  # C
    if np.any(gamma == 0):
        zero = np.flatnonzero(gamma == 0).tolist()
        raise ValueError(f"xhat = (z - beta) / gamma needs every gamma non-zero; channels {zero} are 0")
    z, dact = _invert_activation(y, activation, param)  # like x, like x
    ndim = z.ndim
    xhat = (z - _per_channel(beta, ndim, channel_axis)) / _per_channel(gamma, ndim, channel_axis)  # like x
    invstd = 1.0 / np.sqrt(var + eps)  # C
    mean = np.full_like(var, np.nan)  # C: not recoverable from y, and backward does not read it
    return backward(dy * dact, Cache(xhat, gamma, mean, var, invstd, channel_axis))  # like x, C, C


def _central_differences(loss, args: list[np.ndarray], arg: int, h: float = 1e-6) -> np.ndarray:
    """d loss / d args[arg] by central differences, one element at a time."""
    base = args[arg]
    numeric = np.zeros_like(base)  # like args[arg]
    for i in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[i] += h
        minus[i] -= h
        numeric[i] = (
            loss(*[plus if j == arg else a for j, a in enumerate(args)])
            - loss(*[minus if j == arg else a for j, a in enumerate(args)])
        ) / (2 * h)
    return numeric


def _relative_error(numeric: np.ndarray, analytic: np.ndarray) -> float:
    return float(np.abs(numeric - analytic).max() / (np.abs(analytic).max() + 1e-12))


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

    worst = 0.0
    for arg, analytic in ((0, dx), (1, dgamma), (2, dbeta)):
        worst = max(worst, _relative_error(_central_differences(loss, [x, gamma, beta], arg), analytic))
    return worst


def _check_fused_against_finite_differences(
    seed: int = 0,
    activation: str = "identity",
    param: float = 0.0,
    with_residual: bool = True,
    channel_axis: int = 1,
) -> float:
    """Largest relative error of fused_backward() (dx, dgamma, dbeta and dresidual)
    against central differences of fused_forward()."""
    rng = np.random.default_rng(seed)
    shape = (4, 3, 5) if channel_axis % 3 == 1 else (4, 5, 3)  # B,C,L or B,L,C
    x = rng.normal(size=shape)  # like x
    gamma, beta = rng.normal(size=3), rng.normal(size=3)  # C, C
    residual = rng.normal(size=shape) if with_residual else np.zeros(shape)  # like x
    dy = rng.normal(size=shape)  # like x
    _, cache = fused_forward(
        x, gamma, beta, residual=residual if with_residual else None,
        activation=activation, param=param, channel_axis=channel_axis,
    )  # fmt: skip
    dx, dgamma, dbeta, dresidual = fused_backward(dy, cache)

    def loss(x_, g_, b_, r_):
        y_, _ = fused_forward(
            x_, g_, b_, residual=r_ if with_residual else None,
            activation=activation, param=param, channel_axis=channel_axis,
        )  # fmt: skip
        return float((y_ * dy).sum())

    checks = [(0, dx), (1, dgamma), (2, dbeta)] + ([(3, dresidual)] if with_residual else [])
    worst = 0.0
    for arg, analytic in checks:
        numeric = _central_differences(loss, [x, gamma, beta, residual], arg)
        worst = max(worst, _relative_error(numeric, analytic))
    return worst


_CHECK_PARAMS = {"identity": 0.0, "relu": 0.0, "leaky_relu": 0.2, "elu": 0.7, "silu": 0.0}  # a parameter each


if __name__ == "__main__":
    print(f"backward vs finite differences, max relative error: {_check_against_finite_differences():.2e}")
    for name, param in _CHECK_PARAMS.items():
        for with_residual in (False, True):
            for channel_axis in (1, -1):
                error = _check_fused_against_finite_differences(0, name, param, with_residual, channel_axis)
                print(
                    f"fused_backward ({name}, residual={with_residual}, channel_axis={channel_axis}) "
                    f"vs finite differences, max relative error: {error:.2e}"
                )
