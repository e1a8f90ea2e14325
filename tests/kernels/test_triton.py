"""The ``triton`` backend against the NumPy reference and the ``torch`` backend.

Without a GPU the kernels run under Triton's interpreter on CPU tensors. The
interpreter is chosen when triton is first imported, so this module sets
``TRITON_INTERPRET=1`` before importing it (harmless for the other tests: the
backend never claims CPU tensors). If triton was already imported compiled by
an earlier module, the same tests run in a fresh interpreter process instead.
With a CUDA device (and ``TRITON_INTERPRET`` unset) they run compiled on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="triton is not installed")

import batchnorm  # noqa: E402
from batchnorm import functional as F  # noqa: E402
from batchnorm import kernels, reference  # noqa: E402
from batchnorm.kernels import _triton_kernels  # noqa: E402
from batchnorm.kernels.triton import TritonBackend  # noqa: E402
from tests.helpers import assert_close  # noqa: E402

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - layout of triton's internals
    InterpretedFunction = ()
INTERPRETED = isinstance(_triton_kernels.partial_stats, InterpretedFunction)
RUNNABLE_HERE = ON_GPU or INTERPRETED
here = pytest.mark.skipif(
    not RUNNABLE_HERE,
    reason="triton was imported (compiled) before this module; these run in a fresh "
    "interpreter process instead (test_interpreter_suite_in_a_fresh_process)",
)
DEVICE = "cuda" if ON_GPU else "cpu"

# (dtype, atol, rtol) travel together
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 5e-2, 2e-2),
    (torch.float16, 1e-2, 1e-2),
]
# The single-pass kernels take every small slice; "split" forces the 2-D grid of
# partials with tiny tiles, several programs per channel block and several tiles each.
CONFIGS = {
    "single": TritonBackend(),
    "split": TritonBackend(tile=32, single_pass_max=0, waves=1, min_tiles=1, cpu_sm_count=2),
}
# (N, C, L), layout, config: primes, size-1 dims, N*L == 2, the (B, N) case, tails
CASES = [
    ((2, 3, 5), "contiguous", "single"),
    ((2, 3, 5), "channels_last", "split"),
    ((5, 7, 11), "channels_last", "single"),
    ((3, 2, 37), "contiguous", "split"),
    ((3, 2, 37), "channels_last", "split"),
    ((1, 4, 2), "contiguous", "split"),
    ((6, 10, 1), "contiguous", "split"),  # (B, N) arrives as (B, N, 1)
    ((7, 1, 3), "strided", "split"),
]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as contiguous (N, C, L), channels-last (N, L, C) storage, or a strided view."""
    if layout == "channels_last":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        wide = torch.zeros(x.shape[0], x.shape[1], 2 * x.shape[2], dtype=x.dtype, device=x.device)
        wide[:, :, ::2] = x
        return wide[:, :, ::2]
    return x.contiguous()


def _draw(shape, dtype, layout, mean=1.0, std=2.0):
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).to(dtype)  # values exact in dtype
    return _layout(x.to(DEVICE), layout)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32, device=DEVICE)


def _expect_layout(out: torch.Tensor, x: torch.Tensor, layout: str, what: str) -> None:
    assert out.dtype == x.dtype, what
    if layout == "strided":
        assert out.is_contiguous(), what
    else:
        assert out.stride() == x.stride(), f"{what}: strides {out.stride()} != input's {x.stride()}"


@here
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape,layout,config", CASES)
def test_training_forward_and_backward_match_reference(shape, layout, config, dtype, atol, rtol):
    backend, oracle = CONFIGS[config], kernels.get("torch")
    x, dy = _draw(shape, dtype, layout), _draw(shape, dtype, layout, mean=0.0, std=1.0)
    weight = torch.randn(shape[1], device=DEVICE)
    bias = torch.randn(shape[1], device=DEVICE)
    eps = 1e-3
    y_ref, cache = reference.forward(_np(x), _np(weight), _np(bias), eps)
    dx_ref, dw_ref, db_ref = reference.backward(_np(dy), cache)

    y, mean, var, invstd_used = backend.forward_train(x, weight, bias, eps)
    assert mean.dtype == var.dtype == invstd_used.dtype == torch.float32
    assert_close(invstd_used, cache.invstd, atol, rtol, "invstd")
    _expect_layout(y, x, layout, "y")
    assert_close(mean, cache.mean, atol, rtol, "mean")
    assert_close(var, cache.var, atol, rtol, "var")
    assert_close(y, y_ref, atol, rtol, "y")
    y_torch, _mean_torch, var_torch, _ = oracle.forward_train(x, weight, bias, eps)
    assert_close(y, y_torch, atol, rtol, "y vs torch backend")
    assert_close(var, var_torch, atol, rtol, "var vs torch backend")

    invstd = _f32(cache.invstd)
    dx, sum_dy, sum_dy_xmu = backend.backward_train(dy, x, _f32(cache.mean), invstd, weight)
    _expect_layout(dx, x, layout, "dx")
    assert_close(dx, dx_ref, atol, rtol, "dx")
    assert_close(sum_dy, db_ref, atol, rtol, "dbias")
    assert_close(sum_dy_xmu * invstd, dw_ref, atol, rtol, "dweight")
    dx_torch, _, sum_dy_xmu_torch = oracle.backward_train(dy, x, _f32(cache.mean), invstd, weight)
    assert_close(dx, dx_torch, atol, rtol, "dx vs torch backend")
    assert_close(sum_dy_xmu, sum_dy_xmu_torch, atol, rtol * 10, "sum_dy_xmu vs torch backend")


@here
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES[:2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("config", ["single", "split"])
def test_each_stage_matches_reference(config, layout, dtype, atol, rtol):
    backend = CONFIGS[config]
    shape = (3, 5, 13)
    x, dy = _draw(shape, dtype, layout), _draw(shape, dtype, layout, mean=0.0, std=1.0)
    xs, dys = _np(x), _np(dy)

    mean, var = backend.stats(x)
    mean_ref, var_ref, _n = reference.batch_stats(xs)
    assert_close(mean, mean_ref, atol, rtol, "stats mean")
    assert_close(var, var_ref, atol, rtol, "stats var")

    scale, shift = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    y = backend.apply(x, scale, shift)
    _expect_layout(y, x, layout, "apply")
    assert_close(y, reference.inference(xs, _np(scale), _np(shift)), atol, rtol, "apply")

    sum_dy, sum_dy_xmu = backend.backward_reduce(dy, x, _f32(mean_ref))
    xmu = xs - mean_ref[None, :, None]
    assert_close(sum_dy, dys.sum((0, 2)), atol, rtol, "sum_dy")
    assert_close(sum_dy_xmu, (dys * xmu).sum((0, 2)), atol, rtol, "sum_dy_xmu")

    weight, eps = torch.randn(5, device=DEVICE), 1e-5
    _, cache = reference.forward(xs, _np(weight), np.zeros(5), eps)
    dx_ref, _, _ = reference.backward(dys, cache)
    invstd = _f32(cache.invstd)
    dx = backend.backward_apply(dy, x, _f32(mean_ref), invstd, weight, sum_dy, sum_dy_xmu)
    _expect_layout(dx, x, layout, "backward_apply")
    assert_close(dx, dx_ref, atol, rtol, "backward_apply dx")


@here
@pytest.mark.parametrize("config", ["single", "split"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_without_weight_and_bias(config, layout):
    x, dy = _draw((4, 3, 6), torch.float32, layout), _draw((4, 3, 6), torch.float32, layout)
    y, _, _, _ = CONFIGS[config].forward_train(x, None, None, 1e-5)
    y_ref, cache = reference.forward(_np(x), np.ones(3), np.zeros(3), 1e-5)
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    dx, _, _ = CONFIGS[config].backward_train(dy, x, _f32(cache.mean), _f32(cache.invstd), None)
    assert_close(dx, reference.backward(_np(dy), cache)[0], 1e-5, 1e-5, "dx")


@here
@pytest.mark.parametrize("config", ["single", "split"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_variance_is_stable_for_large_means(config, layout):
    x = _draw((8, 3, 100), torch.float32, layout, mean=1e4, std=1.0)
    mean, var = CONFIGS[config].stats(x)
    mean_ref, var_ref, _ = reference.batch_stats(_np(x))
    assert_close(var, var_ref, 0, 1e-4, "var at mean 1e4")
    assert_close(mean, mean_ref, 0, 1e-6, "mean at mean 1e4")


@here
def test_mixed_parameter_dtypes_as_under_autocast():
    """Half input with float32 weight and bias (what AMP produces), and half weight too."""
    x = _draw((4, 6, 9), torch.float16, "channels_last")
    for wdtype in (torch.float32, torch.float16):
        weight = torch.randn(6, device=DEVICE).to(wdtype)
        bias = torch.randn(6, device=DEVICE).to(wdtype)
        y, mean, _var, _ = CONFIGS["split"].forward_train(x, weight, bias, 1e-5)
        y_ref, _cache = reference.forward(_np(x), _np(weight), _np(bias), 1e-5)
        assert y.dtype == torch.float16 and mean.dtype == torch.float32
        assert_close(y, y_ref, 1e-2, 1e-2, f"y with {wdtype} parameters")


@here
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ghost_and_masked_stages_match_the_torch_backend(layout):
    """The ghost-batch and masked stages composed from the triton kernels (the base class's):
    against the torch backend's, with a fused activation, a last ghost smaller than the others,
    and padding holding NaN."""
    backend, oracle = CONFIGS["split"], kernels.get("torch")
    act = batchnorm.activations.Activation("silu")
    x, dy = _draw((7, 5, 9), torch.float32, layout), _draw((7, 5, 9), torch.float32, layout, mean=0.0)
    weight, bias = torch.randn(5, device=DEVICE), torch.randn(5, device=DEVICE)
    got = backend.forward_train_ghosts(x, 3, weight, bias, 1e-5, act)
    want = oracle.forward_train_ghosts(x, 3, weight, bias, 1e-5, act)
    for name, g, w in zip(("y", "mean", "var", "invstd"), got, want, strict=True):
        assert_close(g, w, 1e-5, 1e-5, f"ghosts {name}")
    assert got[1].shape == (3, 5)
    got = backend.backward_train_ghosts(dy, x, 3, want[1], want[3], weight, bias, act)
    want = oracle.backward_train_ghosts(dy, x, 3, want[1], want[3], weight, bias, act)
    for name, g, w in zip(("dx", "sum_dz", "sum_dz_xmu"), got, want, strict=True):
        assert_close(g, w, 1e-4, 1e-4, f"ghosts {name}")

    valid = torch.arange(9, device=DEVICE)[None] < torch.tensor([9, 2, 5, 0, 9, 1, 4], device=DEVICE)[:, None]
    x = x.masked_fill(~valid.unsqueeze(1), float("nan"))
    count = int(valid.sum())
    got = backend.forward_train_masked(x, valid, count, weight, bias, 1e-5, act)
    want = oracle.forward_train_masked(x, valid, count, weight, bias, 1e-5, act)
    for name, g, w in zip(("y", "mean", "var", "invstd"), got, want, strict=True):
        assert_close(g, w, 1e-5, 1e-5, f"masked {name}")
    assert torch.isfinite(got[0]).all() and (got[0].transpose(1, 2)[~valid] == 0).all()
    got = backend.backward_train_masked(dy, x, valid, count, want[1], want[3], weight, bias, act)
    want = oracle.backward_train_masked(dy, x, valid, count, want[1], want[3], weight, bias, act)
    for name, g, w in zip(("dx", "sum_dz", "sum_dz_xmu"), got, want, strict=True):
        assert_close(g, w, 1e-4, 1e-4, f"masked {name}")
    assert (got[0].transpose(1, 2)[~valid] == 0).all()


class _TritonOnAnyDevice(TritonBackend):
    """The backend as the registry would use it, but accepting this run's tensors."""

    def supports(self, x):
        return x.dtype in (torch.float32, torch.float16, torch.bfloat16)


@here
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_through_functional_batch_norm_with_autograd(monkeypatch, memory_format):
    monkeypatch.setitem(kernels._INSTANCES, "triton", _TritonOnAnyDevice(tile=64, cpu_sm_count=2))
    x = torch.randn(3, 4, 5, 6, device=DEVICE).to(memory_format=memory_format).requires_grad_()
    weight = torch.randn(4, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, device=DEVICE, requires_grad=True)
    running_mean, running_var = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    with batchnorm.backend("triton"):
        assert kernels.select(x.flatten(2)).name == "triton"
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training=True)
        y.backward(torch.ones_like(y).cumsum(-1))
        y_eval = F.batch_norm(x.detach(), running_mean, running_var, weight, bias, training=False)
    x_t = x.detach().clone().requires_grad_()
    w_t, b_t = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    rm_t, rv_t = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    y_t = torch.nn.functional.batch_norm(x_t, rm_t, rv_t, w_t, b_t, training=True)
    y_t.backward(torch.ones_like(y_t).cumsum(-1))
    assert y.is_contiguous(memory_format=memory_format)
    assert_close(y, y_t, 1e-5, 1e-5, "y")
    assert_close(x.grad, x_t.grad, 1e-4, 1e-4, "dx")
    assert_close(weight.grad, w_t.grad, 1e-4, 1e-4, "dweight")
    assert_close(bias.grad, b_t.grad, 1e-4, 1e-4, "dbias")
    assert_close(running_var, rv_t, 1e-6, 1e-6, "running_var")
    y_t_eval = torch.nn.functional.batch_norm(x_t.detach(), rm_t, rv_t, w_t, b_t, training=False)
    assert_close(y_eval, y_t_eval, 1e-5, 1e-5, "eval y")


def test_supports_only_cuda_tensors_of_its_dtypes():
    backend = TritonBackend()
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert not backend.supports(torch.ones(2, 3, 4, dtype=dtype)), f"CPU {dtype}"
    assert kernels.select(torch.ones(2, 3, 4)).name != "triton"
    if torch.cuda.is_available():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert backend.supports(torch.ones(2, 3, 4, dtype=dtype, device="cuda"))
        assert not backend.supports(torch.ones(2, 3, 4, dtype=torch.float64, device="cuda"))


@pytest.mark.skipif(RUNNABLE_HERE, reason="ran in this process")
def test_interpreter_suite_in_a_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


_COMPILE_FOR_SM90 = r"""
import re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batchnorm.kernels import _triton_kernels as K
import batchnorm.kernels.triton as T

launches = []
class Record:  # stands in for a kernel: records what the launcher would launch
    def __init__(self, fn): self.fn = fn
    def __getitem__(self, grid): return lambda *args, num_warps=4, **kw: launches.append((self.fn, args, kw, num_warps))
for name in ("partial_stats", "partial_grad", "affine", "finalize_stats", "finalize_grad", "forward_single",
             "backward_single"):
    setattr(T.K, name, Record(getattr(K, name)))
backend = T.TritonBackend(cpu_sm_count=132)
for shape, channels_last in (((256, 64, 56, 56), False), ((256, 64, 56, 56), True), ((256, 2048, 7, 7), False),
                             ((256, 1024), False)):
    x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x3 = x.flatten(2) if x.dim() == 4 else x.unsqueeze(-1)
    w = torch.empty(shape[1], device="meta")
    backend.forward_train(x3, w, w, 1e-5), backend.backward_train(x3, x3, w, w, w), backend.apply(x3, w, w)

types = {torch.float32: "*fp32", torch.bfloat16: "*bf16"}
done = set()
for fn, args, kw, num_warps in launches:  # specialize as triton's launcher does: ints == 1, 16-divisible
    skip = {fn.arg_names.index(n) for n in fn.do_not_specialize}
    sig, consts, attrs = {}, dict(kw), {}
    for i, (name, a) in enumerate(zip(fn.arg_names, args)):
        if isinstance(a, torch.Tensor):
            sig[name], attrs[(i,)] = types[a.dtype], [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        elif a == 1 and i not in skip:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if a % 16 == 0 and i not in skip:
                attrs[(i,)] = [["tt.divisibility", 16]]
    sig.update({name: "constexpr" for name in kw})
    key = (fn.__name__, str(sorted(sig.items())), str(sorted(consts.items())), str(sorted(attrs)), num_warps)
    if key in done:
        continue
    done.add(key)
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    vector = "ld.global.v" in kernel.asm["ptx"] or "ld.global.nc.v" in kernel.asm["ptx"]
    print(fn.__name__, {k: v for k, v in kw.items() if k.startswith("BLOCK")}, "vector loads" if vector else "")
print("compiled", len(done))
"""


@pytest.mark.skipif(ON_GPU, reason="the GPU run compiles them for its own device")
def test_kernels_compile_for_sm90_with_ptxas():
    """Each kernel specialization the launcher picks for ResNet-50-like layers compiles for an
    H100 (sm_90) with triton's bundled ptxas, no GPU needed; aligned channels-last loads vectorize."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as error:  # pragma: no cover - another triton's internals
        pytest.skip(f"this triton has no ahead-of-time compile API: {error}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("compiled") and int(lines[-1].split()[1]) >= 10, done.stdout
    channels_last = [line for line in lines if "'BLOCK_L': 1}" in line and line.startswith("partial_stats")]
    assert channels_last and all("vector loads" in line for line in channels_last), done.stdout


# ---------------------------------------------------------------------------
# real GPU: compiled kernels on ResNet-sized layers, both paths, against torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(32, 64, 56, 56), (64, 2048, 7, 7), (256, 1024)])
def test_gpu_matches_torch_on_resnet_shapes(shape, memory_format, dtype, atol, rtol):
    if len(shape) == 2 and memory_format == torch.channels_last:
        pytest.skip("channels_last needs 4-D input")
    backend = kernels.get("triton")
    x = torch.randn(shape, device="cuda").mul_(2).add_(1).to(dtype).to(memory_format=memory_format)
    dy = torch.randn(shape, device="cuda").to(dtype).to(memory_format=memory_format)
    x3, dy3 = (x.unsqueeze(-1), dy.unsqueeze(-1)) if x.dim() == 2 else (x.flatten(2), dy.flatten(2))
    assert backend.supports(x3) and kernels.select(x3).name == "triton"
    weight, bias = torch.randn(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
    oracle = kernels.get("torch")
    x64 = x3.double()
    var_ref, mean_ref = torch.var_mean(x64, dim=(0, 2), correction=0)
    for name, candidate in (("auto", backend), ("split", TritonBackend(single_pass_max=0))):
        y, mean, var, invstd = candidate.forward_train(x3, weight, bias, 1e-5)
        assert y.stride() == x3.stride(), name
        assert_close(mean, mean_ref, 1e-5, 1e-5, f"{name} mean")
        assert_close(var, var_ref, 1e-5, 1e-4, f"{name} var")
        assert_close(y, oracle.forward_train(x3, weight, bias, 1e-5)[0], atol, rtol, f"{name} y")
        assert_close(invstd, torch.rsqrt(var + 1e-5), 1e-6, 1e-6, f"{name} invstd")
        dx, sum_dy, sum_dy_xmu = candidate.backward_train(dy3, x3, mean, invstd, weight)
        dx_t, sum_dy_t, sum_dy_xmu_t = oracle.backward_train(dy3, x3, mean, invstd, weight)
        scale = float(sum_dy_t.abs().max()) + 1.0  # sums over up to 10^5 values: compare relative to their size
        assert_close(sum_dy, sum_dy_t, 1e-4 * scale, 1e-4, f"{name} sum_dy")
        assert_close(
            sum_dy_xmu, sum_dy_xmu_t, 1e-4 * (float(sum_dy_xmu_t.abs().max()) + 1.0), 1e-4, f"{name} sum_dy_xmu"
        )
        assert_close(dx, dx_t, atol, rtol, f"{name} dx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_variance_is_stable_for_large_means():
    x = (torch.randn(256, 64, 3136, device="cuda", dtype=torch.float64) + 1e4).float()
    for candidate in (kernels.get("triton"), TritonBackend(single_pass_max=0)):
        _, var = candidate.stats(x)
        expected = torch.var(x.double(), dim=(0, 2), correction=0)
        assert_close(var, expected, 0, 1e-4, "var at mean 1e4")
