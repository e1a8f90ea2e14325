"""Every case of the benchmark's table (``batchnorm.cases``), shrunk, through the public layers
against ``batchnorm.reference``: the ``numba`` and the ``torch`` backend, training forward
(output and running statistics) and backward (dx, dweight, dbias), float32 and float64.

The shapes the benchmark times are the shapes checked here: the same channel counts, layouts
and ``(B, N)`` vs image inputs, at a few thousand elements each (``cases.shrink``).
Tolerances: float64 to 1e-9 relative (1e-10 absolute); float32 as ``test_cpu.py`` holds the
numba kernels to the same oracle, a few float32 ulps of the largest term of each result.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import cases, kernels, reference

CASES = [cases.shrink(case) for case in cases.cases()]
BACKENDS = ["numba", "torch"]
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
MOMENTUM = 0.1


def close(name: str, actual: torch.Tensor, expected: np.ndarray, scale: float = 1.0) -> None:
    """``actual`` against the float64 ``expected``: float64 to 1e-9 relative and 1e-10 absolute,
    float32 to 1e-5 relative and 1e-5 of ``scale`` absolute (``test_cpu.py``'s tolerances)."""
    if actual.dtype == torch.float64:
        rtol, atol = 1e-9, 1e-10
    else:
        rtol, atol = 1e-5, 1e-5 * scale
    torch.testing.assert_close(
        actual.detach().double(),
        torch.from_numpy(np.asarray(expected)),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{name}: {m}",
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_training_forward_and_backward_match_the_reference(case, dtype, backend):
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    x = (torch.randn(case.shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(case.shape, generator=gen, dtype=torch.float64).to(dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    layer = (batchnorm.BatchNorm1d if len(case.shape) == 2 else batchnorm.BatchNorm2d)(case.channels, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(case.channels, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(case.channels, generator=gen, dtype=torch.float64))
    x.requires_grad_()
    with batchnorm.backend(backend):
        assert kernels.select(x.detach().reshape(*case.shape[:2], -1)).name == backend  # no silent fall-back
        y = layer(x)
        y.backward(dy)

    xs, gamma, beta = (
        x.detach().double().numpy(),
        layer.weight.detach().double().numpy(),
        layer.bias.detach().double().numpy(),
    )
    y_ref, cache = reference.forward(xs, gamma, beta, layer.eps)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy.double().numpy(), cache)
    n = case.numel // case.channels
    running_mean, running_var, _ = reference.update_running(
        np.zeros(case.channels), np.ones(case.channels), cache.mean, cache.var, n, MOMENTUM, 0
    )
    big = float(dy.abs().max()) * max(1.0, float(np.abs(cache.xhat).max()))  # largest term of the sums
    close("y", y, y_ref, scale=max(1.0, float(np.abs(y_ref).max())))
    close("running_mean", layer.running_mean, running_mean)
    close("running_var", layer.running_var, running_var)
    close("dx", x.grad, dx_ref, scale=float(np.abs(gamma * cache.invstd).max()) * big)  # the terms that cancel
    close("dweight", layer.weight.grad, dgamma_ref, scale=n * big)
    close("dbias", layer.bias.grad, dbeta_ref, scale=n * big)
    memory_format = torch.channels_last if case.channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format) and x.grad.is_contiguous(memory_format=memory_format)
