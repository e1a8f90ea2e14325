"""Backend choice: automatic by device and dtype, forced by name or environment."""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.kernels.cpu.backend import SMALL_NUMEL


def test_torch_backend_is_always_available():
    assert "torch" in kernels.available()
    assert kernels.get("torch").name == "torch"


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown batchnorm backend 'nope'.*torch"):
        kernels.get("nope")
    with pytest.raises(ValueError, match="unknown batchnorm backend"), batchnorm.backend("nope"):
        pass


def test_context_manager_forces_and_restores():
    x = torch.randn(2, 3, 4)
    automatic = kernels.select(x).name
    with batchnorm.backend("torch"):
        assert kernels.select(x).name == "torch"
        with batchnorm.backend(None):
            assert kernels.select(x).name == automatic
    assert kernels.select(x).name == automatic


def test_environment_variable_forces(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BACKEND", "torch")
    assert kernels.select(torch.randn(2, 3, 4)).name == "torch"
    monkeypatch.setenv("BATCHNORM_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown batchnorm backend"):
        kernels.select(torch.randn(2, 3, 4))


def test_forced_backend_falls_back_to_torch_for_what_it_cannot_take(monkeypatch):
    class OnlyFloat64(kernels.Backend):
        name = "only64"

        def supports(self, x):
            return x.dtype == torch.float64

    monkeypatch.setitem(kernels._INSTANCES, "only64", OnlyFloat64())
    monkeypatch.setitem(kernels._FACTORIES, "only64", "unused:unused")
    with batchnorm.backend("only64"):
        assert kernels.select(torch.randn(2, 3, 1, dtype=torch.float64)).name == "only64"
        assert kernels.select(torch.randn(2, 3, 1, dtype=torch.float16)).name == "torch"


def test_missing_optional_backend_is_reported_not_crashing(monkeypatch):
    monkeypatch.setitem(kernels._FACTORIES, "ghost", "batchnorm.kernels.does_not_exist:Ghost")
    monkeypatch.delitem(kernels._INSTANCES, "ghost", raising=False)
    assert "ghost" not in kernels.available()
    with pytest.raises(RuntimeError, match="'ghost' is not available"):
        kernels.get("ghost")
    kernels._INSTANCES.pop("ghost", None)


def test_statistics_dtype_is_at_least_float32():
    assert kernels.stats_dtype(torch.float16) == torch.float32
    assert kernels.stats_dtype(torch.bfloat16) == torch.float32
    assert kernels.stats_dtype(torch.float32) == torch.float32
    assert kernels.stats_dtype(torch.float64) == torch.float64


def test_numba_declines_small_row_inputs_plain_or_fused(monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    above_small = (4, 64, SMALL_NUMEL // 256 + 1)  # spatial, just over the small-input rule
    for x in (torch.randn(above_small).mT.contiguous().mT, torch.randn(above_small), torch.randn(2, 8, 1 << 15)):
        assert kernels.select(x, fused=True).name == "numba"
    for x in (torch.randn(4, 64, 1 << 14).mT.contiguous().mT, torch.randn(2, 8, 1 << 16)):  # plain: larger
        assert kernels.select(x).name == kernels.select(x, fused=True).name == "numba"
    for x in (torch.randn(4, 8, 49).mT.contiguous().mT, torch.randn(4, 8, 49)):  # small: torch's kernel
        assert kernels.select(x).name == kernels.select(x, fused=True).name == "torch"
    small_rows = torch.randn(16, 8, 1)
    assert kernels.select(small_rows).name == kernels.select(small_rows, fused=True).name == "torch"
    big_rows = torch.randn(1 << 14, 64, 1)
    assert kernels.select(big_rows).name == "numba"
