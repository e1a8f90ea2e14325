"""Input validation for batch norm, with messages that name the expected and
the actual value. Where torch raises something other than ``ValueError`` for
the same mistake, our exception subclasses both, so either ``except`` works.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ShapeError(ValueError, RuntimeError):
    """A tensor's size does not match the layer (torch raises RuntimeError)."""


class DtypeError(ValueError, RuntimeError):
    """Dtypes that cannot be used, or cannot be used together."""


class UnsupportedDtypeError(DtypeError, NotImplementedError):
    """Integer, boolean or complex input (torch raises NotImplementedError)."""


def check_input(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> None:
    """Raise on anything ``batch_norm`` cannot compute correctly (torch returns an empty input's
    empty output whatever its dimensions and dtypes, and so do we)."""
    if x.numel() == 0 and x.is_floating_point():
        return
    if x.dim() < 2:
        raise ValueError(f"batch_norm expects input of shape (N, C, ...) with at least 2 dims, got {x.dim()}D")
    if not x.is_floating_point():
        raise UnsupportedDtypeError(
            f"batch_norm expects a floating-point input (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    channels = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):  # fmt: skip
        if t is not None and t.numel() != channels:
            raise ShapeError(
                f"input has {channels} channels, the layer expects {t.numel()} "
                f"({name} should contain {channels} elements not {t.numel()})"
            )
    if training:
        if not eps > 0:  # also NaN; a comparison, which torch.compile(dynamic=True) traces on a symbolic eps
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        if math.prod(x.shape) == channels and channels > 0:  # one value per channel
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")
    else:
        if not eps >= 0:  # also NaN
            raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given in evaluation mode (training=False)")
    _check_dtypes(x, (running_mean, running_var, weight, bias))  # after the checks torch makes first


def _check_dtypes(x: Tensor, others: tuple[Tensor | None, ...]) -> None:
    dtypes = {t.dtype for t in others if t is not None}
    if not dtypes:
        return
    param_dtype = next(iter(dtypes))
    if len(dtypes) == 1 and (param_dtype == x.dtype or (x.dtype in _LOW_PRECISION and param_dtype == torch.float32)):
        return
    raise DtypeError(
        f"mixed dtype: input is {x.dtype}, weight/bias/running statistics are "
        f"{sorted(str(d) for d in dtypes)}; expected all {x.dtype}"
        + (" or all torch.float32" if x.dtype in _LOW_PRECISION else "")
    )


def check_residual(x: Tensor, residual: Tensor | None) -> None:
    """A residual must broadcast to the input (fused when it has the input's shape and dtype)."""
    if residual is None:
        return
    try:
        torch.broadcast_shapes(x.shape, residual.shape)
    except RuntimeError:
        raise ShapeError(
            f"residual must broadcast to the input {tuple(x.shape)}, got {tuple(residual.shape)}"
        ) from None
