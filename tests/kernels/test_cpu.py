"""The ``numba`` backend against ``reference.py`` (float64 NumPy) and the ``torch`` backend.

Every test runs twice, once on the single-threaded copies of the kernels and once
on the parallel ones (forced for these small shapes by lowering the size
threshold), over contiguous, channels-last and non-contiguous inputs.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import threading
import zlib

import numba
import numpy as np
import pytest
import torch

from batchnorm import kernels, reference
from batchnorm.activations import KINDS, Activation
from batchnorm.kernels import cpu
from batchnorm.kernels.base import Backend
from batchnorm.kernels.cpu import _helpers, backend, loops, memory, residual_loops

BACKEND = cpu.NumbaBackend()
TORCH = kernels.get("torch")
EPS = 1e-5

# dtype, rtol, atol: float32 against a float64 oracle is a few float32 ulps of the largest term.
DTYPES = [
    pytest.param((torch.float32, 1e-5, 1e-5), id="float32"),
    pytest.param((torch.float64, 1e-12, 1e-12), id="float64"),
]
# (N, C, L): primes, 1-sized dimensions, N*L == 2, (B, N) as L == 1, a late ResNet layer, and
# runs and row counts longer than the kernels' blocks summed in float32 (256 values, 64 rows), and
# more channels than one channels-last column block (2048).
SHAPES = [
    (2, 3, 5), (1, 7, 2), (2, 5, 1), (13, 1, 11), (3, 17, 1), (5, 4, 9), (1, 2, 131), (4, 64, 49), (6, 3, 300),
    (2, 2100, 3),
]  # fmt: skip
LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """Which copy of the kernels runs: serial, or parallel on 2 threads."""
    saved = torch.get_num_threads()
    if request.param == "parallel":
        if numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("numba has a single thread on this machine")
        monkeypatch.setattr(cpu.threads, "PARALLEL_MIN_NUMEL", 0)
        torch.set_num_threads(2)
    yield request.param
    torch.set_num_threads(saved)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's name: fresh data per case, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def make(shape, dtype, layout, gen, loc=0.0):
    """An (N, C, L) tensor of normal values laid out as asked."""
    n, c, l = shape
    if layout == "contiguous":
        x = torch.randn(n, c, l, generator=gen, dtype=torch.float64)
    elif layout == "channels_last":
        x = torch.randn(n, l, c, generator=gen, dtype=torch.float64).permute(0, 2, 1)
    else:  # every other element of a wider tensor: neither layout
        x = torch.randn(n, c, 2 * l, generator=gen, dtype=torch.float64)[:, :, ::2]
    return (x + loc).to(dtype)


def params(c, dtype, gen):
    weight = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    return weight, bias


def check(name, actual, expected, rtol, atol, scale=1.0):
    """Elementwise ``|a - e| <= atol * scale + rtol * |e|``; on failure say how far and where."""
    actual = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = expected.detach().double().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    err = np.abs(actual - expected)
    bad = err > atol * scale + rtol * np.abs(expected)
    if bad.any():
        where = np.unravel_index(int(np.argmax(np.where(bad, err, -1))), err.shape)
        pytest.fail(
            f"{name}: {int(bad.sum())}/{err.size} elements off; max error {err.max():.3e} at {where} "
            f"({actual[where]!r} vs {expected[where]!r}), mean error {err.mean():.3e}"
        )


@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_train_matches_reference(dtype_tol, shape, layout, threads, gen):
    dtype, rtol, atol = dtype_tol
    x = make(shape, dtype, layout, gen)
    weight, bias = params(shape[1], dtype, gen)
    y, mean, var, invstd = BACKEND.forward_train(x, weight, bias, EPS)
    y_ref, cache = reference.forward(x.double().numpy(), weight.double().numpy(), bias.double().numpy(), EPS)
    assert mean.dtype == var.dtype == invstd.dtype == y.dtype == dtype
    check("mean", mean, cache.mean, rtol, atol)
    check("var", var, cache.var, rtol, atol)
    check("y", y, y_ref, rtol, atol, scale=max(1.0, float(np.abs(y_ref).max())))
    if layout != "strided":
        assert y.stride() == x.stride()
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_stats_and_apply_match_torch_backend(dtype_tol, shape, layout, threads, gen):
    dtype, rtol, atol = dtype_tol
    x = make(shape, dtype, layout, gen)
    mean, var = BACKEND.stats(x)
    mean_t, var_t = TORCH.stats(x)
    check("mean", mean, mean_t, rtol, atol)
    check("var", var, var_t, rtol, atol)
    scale, shift = params(shape[1], dtype, gen)
    y = BACKEND.apply(x, scale, shift)
    check("apply", y, TORCH.apply(x, scale, shift), rtol, atol, scale=4.0)
    check(
        "apply",
        y,
        reference.inference(x.double().numpy(), scale.double().numpy(), shift.double().numpy()),
        rtol,
        atol,
        scale=4.0,
    )
    if layout != "strided":
        assert y.stride() == x.stride()


@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_train_matches_reference(dtype_tol, shape, layout, threads, gen):
    dtype, rtol, atol = dtype_tol
    x = make(shape, dtype, layout, gen)
    dy = make(shape, dtype, "contiguous", gen)  # the gradient in another layout than x
    weight, bias = params(shape[1], dtype, gen)
    _, cache = reference.forward(x.double().numpy(), weight.double().numpy(), bias.double().numpy(), EPS)
    dx_ref, dgamma, dbeta = reference.backward(dy.double().numpy(), cache)
    mean = torch.from_numpy(cache.mean).to(dtype)
    invstd = torch.from_numpy(cache.invstd).to(dtype)
    dx, sum_dy, sum_dy_xmu = BACKEND.backward_train(dy, x, mean, invstd, weight)
    n = shape[0] * shape[2]
    big = float(dy.abs().max()) * max(1.0, float(np.abs(cache.xhat).max()))
    terms = float(np.abs(cache.gamma * cache.invstd).max()) * big  # size of the terms that cancel in dx
    check("sum_dy", sum_dy, dbeta, rtol, atol, scale=n * big)
    check("dgamma", sum_dy_xmu * invstd, dgamma, rtol, atol, scale=n * big)
    check("dx", dx, dx_ref, rtol, atol, scale=terms)
    assert dx.dtype == sum_dy.dtype == sum_dy_xmu.dtype == dtype
    if layout != "strided":
        assert dx.stride() == x.stride()

    # the two stages on their own agree with the torch backend's
    s1, s2 = BACKEND.backward_reduce(dy, x, mean)
    t1, t2 = TORCH.backward_reduce(dy, x, mean)
    check("backward_reduce sum_dy", s1, t1, rtol, atol, scale=n * big)
    check("backward_reduce sum_dy_xmu", s2, t2, rtol, atol, scale=n * big / float(invstd.min()))
    dx2 = BACKEND.backward_apply(dy, x, mean, invstd, weight, t1, t2)
    check("backward_apply", dx2, TORCH.backward_apply(dy, x, mean, invstd, weight, t1, t2), rtol, atol, scale=terms)


@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_no_weight_no_bias(dtype_tol, threads, gen):
    dtype, rtol, atol = dtype_tol
    x = make((3, 4, 7), dtype, "channels_last", gen)
    y, mean, _, invstd = BACKEND.forward_train(x, None, None, EPS)
    y_ref, cache = reference.forward(x.double().numpy(), np.ones(4), np.zeros(4), EPS)
    check("y", y, y_ref, rtol, atol, scale=4.0)
    dy = make((3, 4, 7), dtype, "channels_last", gen)
    dx, _, _ = BACKEND.backward_train(dy, x, mean, invstd, None)
    check("dx", dx, reference.backward(dy.double().numpy(), cache)[0], rtol, atol, scale=100.0)


ACTS = [
    Activation(),
    Activation("relu"),
    Activation("leaky_relu", 0.2),
    Activation("elu", 0.7),
    Activation("silu"),
]


def _origins(name: str) -> set[str]:
    """How the kernels of activation ``name`` used so far in this process were built: "cache"
    (loaded from Numba's disk cache) or "compiled" (here)."""
    family = cpu.loops.training(name)
    found = set()
    for kernel in vars(family).values():
        for dispatcher in kernel:
            if dispatcher.signatures:
                found.add("cache" if sum(dispatcher.stats.cache_hits.values()) else "compiled")
    return found


def _same_statistics(got, want, act, x):
    """The fused kernel's statistics against the identity kernel's: bit for bit when both kernels
    were built alike (both compiled in this process, or both loaded from the cache). A kernel
    loaded from Numba's cache can round the float32 sums differently from the same kernel
    compiled in the process (both are exact to rounding), so across the two the statistics are
    held to the rounding of those sums instead: a few units of x's dtype at x's magnitude for the
    mean, relative for the variance and invstd."""
    origins = _origins(act.name) | _origins("identity")
    if len(origins) == 1:
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w), f"{act}: {g} != {w} (kernels {origins.pop()})"
        return
    eps = torch.finfo(x.dtype).eps
    scale = float(x.abs().max()) if x.numel() else 1.0
    (mean, var, invstd), (mean_ref, var_ref, invstd_ref) = got, want
    torch.testing.assert_close(mean, mean_ref, rtol=0, atol=16 * eps * scale)
    torch.testing.assert_close(var, var_ref, rtol=16 * eps, atol=16 * eps * scale * scale)
    torch.testing.assert_close(invstd, invstd_ref, rtol=16 * eps, atol=0)


def _composed(x, weight, bias, dy, act):
    """The base class's composition of the fused stages (our stages, torch's activation)."""
    y, mean, var, invstd = Backend.forward_train(BACKEND, x, weight, bias, EPS, act)
    return (y, mean, var, invstd), Backend.backward_train(BACKEND, dy, x, mean, invstd, weight, bias, act)


@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_fused_activation_stages_match_composition(dtype_tol, shape, layout, act, affine, threads, gen):
    """The kernels' own activation (forward) and ``dz = dy * act'(z)`` (backward) against the
    base class's composition on the same kernels, every layout, serial and parallel."""
    dtype, rtol, atol = dtype_tol
    x = make(shape, dtype, layout, gen)
    dy = make(shape, dtype, "contiguous", gen)
    weight, bias = params(shape[1], dtype, gen) if affine else (None, None)
    y, mean, var, invstd = BACKEND.forward_train(x, weight, bias, EPS, act)
    (y_ref, mean_ref, var_ref, invstd_ref), (dx_ref, s1_ref, s2_ref) = _composed(x, weight, bias, dy, act)
    _same_statistics((mean, var, invstd), (mean_ref, var_ref, invstd_ref), act, x)
    scale = max(1.0, float(y_ref.abs().max()))
    check("y", y, y_ref, rtol, atol, scale=scale)
    if layout != "strided":
        assert y.stride() == x.stride()
    dx, s1, s2 = BACKEND.backward_train(dy, x, mean, invstd, weight, bias, act)
    n = shape[0] * shape[2]
    big = float(dy.abs().max()) * max(1.0, float((x.double() - mean.double()[:, None]).abs().max()))
    check("sum_dz", s1, s1_ref, rtol, atol, scale=n * big)
    check("sum_dz_xmu", s2, s2_ref, rtol, atol, scale=n * big)
    terms = float(invstd.abs().max()) * (1.0 if weight is None else float(weight.abs().max())) * big
    check("dx", dx, dx_ref, rtol, atol, scale=terms * 4)
    assert dx.dtype == s1.dtype == s2.dtype == dtype
    if layout != "strided":
        assert dx.stride() == x.stride()


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_activation_nan_and_inf_as_composition(act, layout, threads, gen):
    """NaN in x stays in its channel (through the activation), an infinite dy element spreads
    where the composition spreads it: the same NaN pattern, and finite values agree."""
    x = make((4, 3, 9), torch.float32, layout, gen)
    x[1, 0, 2] = float("nan")
    dy = make((4, 3, 9), torch.float32, layout, gen)
    dy[2, 1, 3] = float("inf")
    weight, bias = params(3, torch.float32, gen)
    y, mean, _, invstd = BACKEND.forward_train(x, weight, bias, EPS, act)
    (y_ref, _, _, _), (dx_ref, s1_ref, s2_ref) = _composed(x, weight, bias, dy, act)
    dx, s1, s2 = BACKEND.backward_train(dy, x, mean, invstd, weight, bias, act)
    for name, a, e in [("y", y, y_ref), ("dx", dx, dx_ref), ("sum_dz", s1, s1_ref), ("sum_dz_xmu", s2, s2_ref)]:
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name
        assert torch.equal(torch.isinf(a), torch.isinf(e)), name
        finite = torch.isfinite(e)
        check(name, a[finite], e[finite], 1e-4, 1e-4, scale=100.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_variance_of_data_far_from_zero(layout, threads, gen):
    """Mean 1e4, std 1: the variance to 1e-4 relative of the float64 reference."""
    x = make((8, 3, 401), torch.float32, layout, gen, loc=1e4)
    _, var = BACKEND.stats(x)
    _, expected, _ = reference.batch_stats(x.double().numpy())
    np.testing.assert_allclose(var.double().numpy(), expected, rtol=1e-4)
    _, _, var2, _ = BACKEND.forward_train(x, None, None, EPS)
    np.testing.assert_allclose(var2.double().numpy(), expected, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32_backward_of_data_far_from_zero(layout, threads, gen):
    """Mean 1e4, std 1: ``x - mean`` summed in float32 blocks keeps the gradients to 1e-4 of the
    float64 result for the same (float32) saved mean and invstd."""
    x = make((8, 3, 401), torch.float32, layout, gen, loc=1e4)
    dy = make((8, 3, 401), torch.float32, layout, gen, loc=0.5)
    weight, _ = params(3, torch.float32, gen)
    mean, var = BACKEND.stats(x)
    invstd = torch.rsqrt(var + EPS)
    dx, sum_dy, sum_dy_xmu = BACKEND.backward_train(dy, x, mean, invstd, weight)
    x64, g64 = x.double().numpy(), dy.double().numpy()
    m64, s64, w64 = (t.double().numpy()[None, :, None] for t in (mean, invstd, weight))
    n = x.shape[0] * x.shape[2]
    expect_dy = g64.sum(axis=(0, 2))
    expect_dy_xmu = (g64 * (x64 - m64)).sum(axis=(0, 2))
    xhat = (x64 - m64) * s64
    mean_g_xhat = (g64 * xhat).sum(axis=(0, 2))[None, :, None] / n
    expect_dx = w64 * s64 * (g64 - expect_dy[None, :, None] / n - xhat * mean_g_xhat)
    check("sum_dy", sum_dy, expect_dy, 1e-5, 1e-4)
    check("sum_dy_xmu", sum_dy_xmu, expect_dy_xmu, 1e-4, 1e-3)
    check("dx", dx, expect_dx, 1e-4, 1e-4, scale=float(np.abs(expect_dx).max()))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_same_threads_same_bits(layout, threads, gen):
    x = make((16, 3, 333), torch.float32, layout, gen)
    dy = make((16, 3, 333), torch.float32, layout, gen)
    first = BACKEND.forward_train(x, None, None, EPS)
    again = BACKEND.forward_train(x, None, None, EPS)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    grads = [BACKEND.backward_train(dy, x, first[1], first[3], None) for _ in range(2)]
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_nan_stays_in_its_channel(threads):
    x = torch.randn(4, 3, 50)
    x[1, 0, 7] = float("nan")
    y, mean, var, _ = BACKEND.forward_train(x, None, None, EPS)
    assert mean[0].isnan() and var[0].isnan() and y[:, 0].isnan().all()
    assert mean[1:].isfinite().all() and y[:, 1:].isfinite().all()


def test_empty_batch():
    x = torch.empty(0, 3, 4)
    y, mean, var, invstd = BACKEND.forward_train(x, None, None, EPS)
    assert y.shape == x.shape and mean.isnan().all() and var.isnan().all() and invstd.isnan().all()
    assert BACKEND.apply(x, torch.ones(3), torch.zeros(3)).shape == x.shape


def test_supports_float32_float64_on_cpu_only():
    assert BACKEND.supports(torch.ones(2, 3, 1))
    assert BACKEND.supports(torch.ones(2, 3, 1, dtype=torch.float64))
    for dtype in (torch.float16, torch.bfloat16, torch.int64):
        assert not BACKEND.supports(torch.ones(2, 3, 1, dtype=dtype))


def test_chosen_automatically_for_cpu_float(monkeypatch):
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    assert kernels.select(torch.ones(2, 3, backend.SMALL_NUMEL)).name == "numba"
    assert kernels.select(torch.ones(2, 3, backend.SMALL_NUMEL, dtype=torch.bfloat16)).name == "torch"


def test_concurrent_callers_get_right_answers(monkeypatch):
    """Threads racing for the parallel kernels: the loser runs the serial copy."""
    monkeypatch.setattr(cpu.threads, "PARALLEL_MIN_NUMEL", 0)
    xs = [torch.randn(6, 5, 300) for _ in range(4)]
    results = [None] * len(xs)

    def work(i):
        for _ in range(5):
            results[i] = BACKEND.forward_train(xs[i], None, None, EPS)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for x, (_, mean, var, _) in zip(xs, results, strict=True):
        check("mean", mean, TORCH.stats(x)[0], 1e-5, 1e-5)
        check("var", var, TORCH.stats(x)[1], 1e-5, 1e-5)


def _forward_in_child(seed):
    x = torch.randn(6, 5, 300, generator=torch.Generator().manual_seed(seed))
    y, mean, var, _ = BACKEND.forward_train(x, None, None, EPS)
    return x.numpy(), y.numpy(), mean.numpy(), var.numpy()


class _Normalized(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = torch.randn(6, 5, 300, generator=torch.Generator().manual_seed(i))
        return x, BACKEND.forward_train(x, None, None, EPS)[0]


@pytest.mark.skipif(sys.platform == "win32", reason="fork start method")
def test_forked_children_after_parallel_use(monkeypatch):
    """Forked workers (DataLoader, multiprocessing) after the parent ran the parallel kernels."""
    monkeypatch.setattr(cpu.threads, "PARALLEL_MIN_NUMEL", 0)
    BACKEND.forward_train(torch.randn(6, 5, 300), None, None, EPS)  # the parent's thread pool is up
    with multiprocessing.get_context("fork").Pool(2) as pool:
        for x, y, mean, var in pool.map(_forward_in_child, range(3)):
            _, cache = reference.forward(x, np.ones(5), np.zeros(5), EPS)
            check("child mean", mean, cache.mean, 1e-5, 1e-5)
            check("child var", var, cache.var, 1e-5, 1e-5)
            check("child y", y, reference.forward(x, np.ones(5), np.zeros(5), EPS)[0], 1e-5, 1e-5, 4.0)
    loader = torch.utils.data.DataLoader(_Normalized(), batch_size=2, num_workers=2, multiprocessing_context="fork")
    for x, y in loader:
        for xi, yi in zip(x, y, strict=True):
            check("worker y", yi, reference.forward(xi.numpy(), np.ones(5), np.zeros(5), EPS)[0], 1e-5, 1e-5, 4.0)


@pytest.mark.slow
def test_disk_cache_and_one_compile_message(tmp_path):
    """With an empty cache the first process says it compiles, once; the next loads silently."""
    script = (
        "import torch; from batchnorm.kernels import cpu; b = cpu.NumbaBackend();"
        "[b.forward_train(torch.randn(2, 3, 4), None, None, 1e-5) for _ in range(3)];"
        "b.apply(torch.randn(2, 3, 4), torch.ones(3), torch.zeros(3))"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stderr.count("compiling the numba CPU kernels") == 1, runs[0].stderr
    assert "compiling" not in runs[1].stderr, runs[1].stderr
    assert any(name.endswith(".nbi") for _, _, files in os.walk(tmp_path) for name in files)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_outputs_on_their_own_mapping_behave_like_tensors(layout, monkeypatch, gen):
    """Large outputs are mapped with huge pages requested: same values, strides, and lifetime."""
    monkeypatch.setattr(memory, "HUGE_PAGE_MIN_BYTES", 0)
    x = make((3, 4, 7), torch.float32, layout, gen)
    dy = make((3, 4, 7), torch.float32, layout, gen)
    y, mean, var, invstd = BACKEND.forward_train(x, None, None, EPS)
    dx, _, _ = BACKEND.backward_train(dy, x, mean, invstd, None)
    z = BACKEND.apply(x, mean, var)
    y_ref, cache = reference.forward(x.double().numpy(), np.ones(4), np.zeros(4), EPS)
    del x
    for out in (y, dx, z):
        assert out._base is None and out.stride() == dy.stride()
    check("y", y, y_ref, 1e-5, 1e-5, scale=4.0)
    check("dx", dx, reference.backward(dy.double().numpy(), cache)[0], 1e-5, 1e-5, scale=100.0)
    y.relu_()  # in place, as a following ReLU(inplace=True) does
    assert (y >= 0).all() and y.clone().equal(y)


def test_freed_large_outputs_are_reused_never_while_alive(monkeypatch, gen):
    monkeypatch.setattr(memory, "HUGE_PAGE_MIN_BYTES", 0)
    cpu.release_memory()
    x = make((3, 4, 7), torch.float32, "contiguous", gen)
    scale, shift = params(4, torch.float32, gen)
    first = BACKEND.apply(x, scale, shift)
    second = BACKEND.apply(x, scale, shift)
    assert first.data_ptr() != second.data_ptr()
    address = first.data_ptr()
    del first
    gc.collect()
    third = BACKEND.apply(x, scale, shift)
    assert third.data_ptr() == address  # the freed buffer came back
    assert torch.equal(third, second)
    monkeypatch.setattr(memory, "POOL_MAX_BYTES", 0)
    del third
    assert not any(memory._pool.values())  # over the cap: nothing kept
    cpu.release_memory()


@pytest.mark.parametrize("shape", [(1, 3, 1), (4, 3, 5), (6, 3, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stats_of_constant_channels_and_single_values(shape, channels_last):
    x = torch.full(shape, 2.5)  # every channel constant: variance exactly 0
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    mean, var = kernels.get("numba").stats(x)
    assert torch.equal(mean, torch.full((3,), 2.5)) and torch.equal(var, torch.zeros(3))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_backward_takes_act_prime_where_the_forward_took_the_sign(layout, dtype, threads, gen):
    """The backward recomputes ``z`` from x rounded exactly as the forward: with ``dy = 1``,
    ``sum(dz)`` counts the elements where the forward's ReLU let ``z`` through, even at the kink."""
    n, c, l = 8, 3, 257
    signs = (torch.randint(0, 2, (n, c, l), generator=gen) * 2 - 1).to(dtype)
    nudges = torch.randint(-3, 4, (n, c, l), generator=gen).to(dtype) * torch.finfo(dtype).eps
    x = signs + nudges  # mean about 0, variance about 1: many z within a few ulps of 0 below
    if layout == "channels_last":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    mean, var = BACKEND.stats(x)
    bias = -(1 - mean) * weight * torch.rsqrt(var + EPS)  # z = 0 about where x = 1
    relu = Activation("relu")
    y, mean, var, invstd = BACKEND.forward_train(x, weight, bias, EPS, relu)
    _, sum_dz, _ = BACKEND.backward_train(torch.ones_like(x), x, mean, invstd, weight, bias, relu)
    assert torch.equal(sum_dz, (y > 0).sum((0, 2)).to(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(5, 4, 9), (6, 3, 300), (3, 17, 1)], ids=str)
def test_invstd_is_one_over_sqrt_of_var_plus_eps_in_the_dtype(shape, dtype, layout, threads, gen):
    """The forward returns the invstd it normalized with: ``1 / sqrt(var + eps)`` with var as
    returned, each step rounded to x's dtype (as ``torch.rsqrt``), plain and with a residual."""
    x = make(shape, dtype, layout, gen, loc=3.0) * 5
    weight, bias = params(shape[1], dtype, gen)
    eps = 1e-3
    residual = make(shape, dtype, layout, gen)
    results = [
        BACKEND.forward_train(x, weight, bias, eps),
        BACKEND.forward_train(x, weight, bias, eps, Activation("relu")),
        BACKEND.forward_train_residual(x, weight, bias, eps, residual, Activation("leaky_relu", 0.1))[:4],
    ]
    for _, _, var, invstd in results:
        assert invstd.dtype == dtype and invstd.shape == (shape[1],)
        assert torch.equal(invstd, torch.rsqrt(var + eps))
        v = var.numpy()
        np.testing.assert_array_equal(invstd.numpy(), v.dtype.type(1) / np.sqrt(v + v.dtype.type(eps)))
    # y is normalized with that invstd: (x - mean) * (weight * invstd) + bias, to rounding
    y, mean, var, invstd = results[0]
    scale = weight * invstd  # x's dtype, as the kernels'
    z = (x - mean[None, :, None]) * scale[None, :, None] + bias[None, :, None]
    check("y", y, z, 4 * torch.finfo(dtype).eps, 4 * torch.finfo(dtype).eps, scale=float(z.abs().max()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype_tol", DTYPES)
def test_backward_apply_takes_the_count_of_the_sums(dtype_tol, layout, threads, gen):
    """``count`` is the number of values per channel the sums are over (a synchronized layer's
    global count): it, not x's ``N * L``, divides in the coefficients; ``None`` is ``N * L``."""
    dtype, rtol, atol = dtype_tol
    shape = (4, 5, 33)
    x = make(shape, dtype, layout, gen)
    dy = make(shape, dtype, layout, gen)
    weight, _ = params(shape[1], dtype, gen)
    mean, var = BACKEND.stats(x)
    invstd = torch.rsqrt(var + EPS)
    s1, s2 = BACKEND.backward_reduce(dy, x, mean)
    n = shape[0] * shape[2]
    same = BACKEND.backward_apply(dy, x, mean, invstd, weight, s1, s2)
    assert torch.equal(same, BACKEND.backward_apply(dy, x, mean, invstd, weight, s1, s2, count=n))
    for count in (3 * n, 7 * n + 5):
        dx = BACKEND.backward_apply(dy, x, mean, invstd, weight, 3 * s1, 3 * s2, count=count)
        expected = TORCH.backward_apply(dy, x, mean, invstd, weight, 3 * s1, 3 * s2, count=count)
        terms = float((weight * invstd).abs().max()) * float(dy.abs().max()) * 4
        check(f"dx (count {count})", dx, expected, rtol, atol, scale=terms)
        k = (weight * invstd).double()[None, :, None]
        by_hand = k * (
            dy.double()
            - 3 * s1.double()[None, :, None] / count
            - (x.double() - mean.double()[None, :, None])
            * invstd.double()[None, :, None] ** 2
            * (3 * s2.double()[None, :, None])
            / count
        )
        check(f"dx by hand (count {count})", dx, by_hand, rtol, atol, scale=terms)


@numba.njit(fastmath=_helpers.FASTMATH, error_model=_helpers.ERROR_MODEL)
def _exp_each(x, out):
    for i in range(x.shape[0]):
        out[i] = _helpers.exp_of(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_exp_against_float64_libm(dtype, rng):
    """The kernels' exp (ELU, SiLU): float32 within 4e-7 relative on [-87.3, 88.3] (a vectorizable
    polynomial), 0 below, inf above, NaN kept; float64 is libm's exp (NumPy's differs by an ulp)."""
    x = np.concatenate([np.linspace(-100, 100, 200_001), rng.standard_normal(10_000) * 5]).astype(dtype)
    x = np.concatenate([x, np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, -1e-30, 1e-30], dtype)])
    got = np.empty_like(x)
    _exp_each(x, got)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64))
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=2.3e-16, atol=0)
        return
    inside = (x > -87.3) & (x < 88.3)
    np.testing.assert_allclose(got[inside], want[inside], rtol=4e-7, atol=0)
    assert (got[x <= -87.34] == 0).all() and np.isposinf(got[x >= 88.38]).all()
    assert np.isnan(got[np.isnan(x)]).all()


def test_scalar_forms_are_the_in_kernel_activations():
    assert set(_helpers.SCALAR_FORMS) == {name for name, kind in KINDS.items() if kind.in_kernel}


@pytest.mark.parametrize("name", sorted(_helpers.SCALAR_FORMS))
def test_each_activation_has_its_own_kernels(name):
    """Kernels are compiled per activation under their own names (their own disk-cache entries)."""
    for family, kernel_names in [
        (loops.training(name), ("ncl_forward", "ncl_backward", "nlc_forward", "nlc_backward")),
        (residual_loops.forward(name), ("ncl_forward_res", "nlc_apply_res")),
    ]:
        for kernel_name in kernel_names:
            kernel = getattr(family, kernel_name)
            assert kernel.parallel.py_func.__qualname__ == f"{kernel_name}_{name}"
            assert kernel.serial.py_func.__qualname__ == f"{kernel_name}_{name}_serial"
            assert kernel.parallel.py_func.__globals__["act"] is _helpers.SCALAR_FORMS[name][0]
    assert loops.training(name) is loops.training(name)  # built once


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype_tol", DTYPES)
@pytest.mark.parametrize("act", [Activation("relu"), Activation("leaky_relu", 0.3)], ids=str)
def test_per_activation_kernels_apply_the_activation_bit_for_bit(act, dtype_tol, layout, threads, gen):
    """Each activation's forward kernel writes torch's activation of the identity kernel's y,
    bit for bit; its backward (dy = 1 at the kink's both sides) sums act'(z) of that same z;
    NaN: relu(NaN) = NaN, relu'(NaN) = 0, leaky'(NaN) = the slope."""
    dtype, rtol, atol = dtype_tol
    shape = (6, 5, 40)
    x = make(shape, dtype, layout, gen)
    x[2, 1, 3] = float("nan")  # channel 1: every z NaN
    weight, bias = params(shape[1], dtype, gen)
    y_id, mean, _, invstd = BACKEND.forward_train(x, weight, bias, EPS)
    y, *_ = BACKEND.forward_train(x, weight, bias, EPS, act)
    expected = torch.nn.functional.leaky_relu(y_id, act.param) if act.name == "leaky_relu" else torch.relu(y_id)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())
    _, sum_dz, _ = BACKEND.backward_train(torch.ones_like(x), x, mean, invstd, weight, bias, act)
    slope = act.negative_slope
    dact = torch.full_like(y_id, slope).masked_fill_(y_id > 0, 1.0).double()  # NaN is not > 0
    check("sum_dz", sum_dz, dact.sum((0, 2)), rtol, atol, scale=float(x.numel()))
    assert float(sum_dz[1]) == pytest.approx(slope * shape[0] * shape[2])  # NaN channel: act'(NaN) = slope


def test_prefers_leaves_small_inputs_to_torch(monkeypatch):
    """Up to ``SMALL_NUMEL`` elements torch's own kernel is faster (measured), plain or fused;
    ``(B, N)`` inputs up to ``PREFER_MIN_ROWS_NUMEL``; the automatic choice follows."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    small = backend.SMALL_NUMEL
    at = torch.empty(2, 4, small // 8)
    above = torch.empty(2, 4, small // 8 + 1)
    for fused in (False, True):
        assert not BACKEND.prefers(at, fused) and not BACKEND.prefers(at.to(torch.float64), fused)
        assert not BACKEND.prefers(above.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :1], fused)
        rows = backend.PREFER_MIN_ROWS_NUMEL
        assert not BACKEND.prefers(torch.empty(rows // 4 - 1, 4, 1), fused)
        assert BACKEND.prefers(torch.empty(rows // 4, 4, 1), fused)
        assert kernels.select(at, fused).name == "torch"
    assert BACKEND.prefers(above, fused=True) and BACKEND.prefers(above.to(torch.float64), fused=True)
    assert kernels.select(above, fused=True).name == "numba"


@pytest.mark.parametrize("channels_last", [False, True], ids=["ncl", "nlc"])
def test_plain_training_goes_to_numba_only_from_its_own_size(channels_last, monkeypatch):
    """Plain layers (no activation or residual) take torch's kernel below
    ``PREFER_PLAIN_MIN_NUMEL`` (NCHW) or ``PREFER_PLAIN_CHANNELS_LAST_MIN_NUMEL`` (channels-last),
    where our fused kernels already win."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    limit = backend.PREFER_PLAIN_CHANNELS_LAST_MIN_NUMEL if channels_last else backend.PREFER_PLAIN_MIN_NUMEL

    def shaped(numel):
        x = torch.empty(2, 8, numel // 16)
        return x.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else x

    below, at = shaped(limit - 16), shaped(limit)
    assert not BACKEND.prefers(below) and BACKEND.prefers(below, fused=True)
    assert BACKEND.prefers(at) and BACKEND.prefers(at, fused=True)
    assert kernels.select(below).name == "torch" and kernels.select(at).name == "numba"


def test_prefers_eval_only_from_32_mib_of_output(monkeypatch):
    """Eval's multiply-add is torch's below ``PREFER_EVAL_MIN_BYTES`` (faster there, measured),
    whatever the layout or dtype; training keeps its own rule."""
    monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    limit = backend.PREFER_EVAL_MIN_BYTES
    for dtype in (torch.float32, torch.float64):
        size = torch.finfo(dtype).bits // 8
        below = torch.empty(2, 8, limit // size // 16 - 1, dtype=dtype)
        at = torch.empty(2, 8, limit // size // 16, dtype=dtype)
        rows = torch.empty(limit // size // 64, 64, 1, dtype=dtype)  # (B, N): bytes alone decide
        for fused in (False, True):
            assert BACKEND.prefers(below, fused) and not BACKEND.prefers_eval(below, fused)
            assert BACKEND.prefers_eval(at, fused) and BACKEND.prefers_eval(rows, fused)
            assert kernels.select(below, fused, training=False).name == "torch"
            assert kernels.select(below, fused, training=True).name == "numba"
            assert kernels.select(at, fused, training=False).name == "numba"
