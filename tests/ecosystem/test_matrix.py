"""Every path a PyTorch user takes with batch norm, on ours and on torch's layers, with the same numbers.

Cells: path x layer kind (BatchNorm1d/2d/3d, channels-last, the fused ReLU and
add + ReLU forms, SyncBatchNorm at one process) x train/eval x backend
(automatic, torch and numba forced) x input size (below the small-input
threshold, where our layer runs torch's own kernel, and above it, where our
kernels run). Each cell runs the path on our layer and on torch's with the
same state and inputs and compares every tensor the path returns.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

import batchnorm
from tests.ecosystem.layers import KINDS, check_sizes
from tests.ecosystem.paths import PATHS
from tests.helpers import assert_close

# what our layer says where torch's fails (a transform with running statistics it cannot write)
TRANSFORM_ADVICE = "replace_all_batch_norm_modules_"


def _cells():
    for path_name, path in PATHS.items():
        for kind in KINDS:
            if not path.applies(kind):
                continue
            for size in path.sizes:
                for mode in ("eval",) if kind.frozen else path.modes:
                    for backend in path.backends:
                        cell = f"{path_name}-{kind.name}-{size}-{mode}-{backend}"
                        marks = [pytest.mark.slow] if path_name.startswith("compile") else []
                        yield pytest.param(path_name, kind, size, mode, backend, id=cell, marks=marks)


def test_sizes_straddle_the_small_input_threshold():
    check_sizes()


@pytest.mark.parametrize(("path_name", "kind", "size", "mode", "backend"), list(_cells()))
def test_cell(path_name, kind, size, mode, backend):
    path = PATHS[path_name]
    ours, theirs = kind.pair(**(path.ctor or {}))
    training = mode == "train"
    ours.train(training), theirs.train(training)
    xs = kind.inputs(size)
    forced = contextlib.nullcontext() if backend == "auto" else batchnorm.backend(backend)
    expected_error = (path.expect_error or {}).get(kind.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' and tracers' own advice
        if expected_error is not None:
            with forced, pytest.raises(RuntimeError, match=expected_error):
                path.fn(ours, tuple(x.clone() for x in xs), training)
            return
        try:
            expected = (path.reference or path.fn)(theirs, tuple(x.clone() for x in xs), training)
        except RuntimeError as torch_error:  # where torch fails, ours must work or say what to do
            with forced, pytest.raises(RuntimeError, match=TRANSFORM_ADVICE) as ours_error:
                path.fn(ours, tuple(x.clone() for x in xs), training)
            assert "running statistics" in str(torch_error) or "captured Tensor" in str(torch_error), torch_error
            assert ours_error.value.__cause__ is None or isinstance(ours_error.value.__cause__, RuntimeError)
            return
        with forced:
            got = path.fn(ours, tuple(x.clone() for x in xs), training)
    assert got.keys() == expected.keys()
    per_channel = math.prod(xs[0].shape) // xs[0].shape[1]
    for name, value in expected.items():
        if value is None:
            assert got[name] is None, f"{name}: torch gave None, ours {got[name]}"
            continue
        assert got[name] is not None, f"{name}: ours gave None"
        assert got[name].dtype == value.dtype or name.startswith("d"), f"{name}: {got[name].dtype} != {value.dtype}"
        if name == "num_batches_tracked":
            assert torch.equal(got[name], value), f"num_batches_tracked: {got[name]} != {value}"
            continue
        atol = path.tolerance
        if name in ("dweight", "dbias"):  # a sum over every value of the channel: rounding grows with it
            atol *= max(1.0, math.sqrt(per_channel) / 10)
        assert_close(got[name], value, atol, path.tolerance, name)


@pytest.mark.parametrize("size", ["small", "large"])
def test_vmap_over_a_training_layer_with_running_statistics_says_what_to_do(size):
    """torch's layer fails here too (it cannot write per-sample statistics into one buffer)."""
    kind = KINDS[2]  # bn2d
    ours, theirs = kind.pair()
    (x,) = kind.inputs(size)
    stacked = torch.stack([x, x * 2])
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        torch.func.vmap(theirs)(stacked)
    with pytest.raises(RuntimeError, match=TRANSFORM_ADVICE):
        torch.func.vmap(ours)(stacked)
    torch.func.replace_all_batch_norm_modules_(ours)  # the documented way out
    torch.func.replace_all_batch_norm_modules_(theirs)
    assert_close(torch.func.vmap(ours)(stacked), torch.func.vmap(theirs)(stacked), 1e-4, 1e-4, "after the fix")
