"""The paths a PyTorch user takes with batch-norm layers, each a function run on ours and on torch's.

A path takes a model (our layer, or torch's equivalent), its inputs and the
mode, and returns named tensors (outputs, tangents, gradients, the running
statistics afterwards) that the matrix compares between the two. ``PATHS``
also says which cells of the matrix a path runs in, and the line of the
README's compatibility table that describes it.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.func import functional_call

from tests.ecosystem.layers import Kind

Tensor = torch.Tensor
ALL_BACKENDS = ("auto", "torch", "numba")


def _state(model: nn.Module) -> dict[str, Tensor]:
    """The running statistics of the batch-norm layer in ``model`` (wrapped, traced or scripted)."""
    bn = next((m for m in model.modules() if hasattr(m, "num_batches_tracked")), None)  # frozen ones have none
    return {name: getattr(bn, name) for name in ("running_mean", "running_var", "num_batches_tracked")
            if getattr(bn, name, None) is not None}  # fmt: skip


class Holder(nn.Module):
    """A model around the layer, as symbolic tracing needs (it traces into the module it is given)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, residual=None):
        return self.layer(x) if residual is None else self.layer(x, residual)


def _cotangent(like: Tensor) -> Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(7), dtype=like.dtype)


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _short(grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """``bn.weight`` (torch's wrapped layer) and ``weight`` (ours) under one name."""
    return {f"d{name.rpartition('.')[2]}": g for name, g in grads.items()}


def _new_inputs(xs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for x in xs:
        fresh = torch.randn(x.shape, generator=gen, dtype=x.dtype) * 1.5 - 0.3
        out.append(fresh.contiguous(memory_format=_format(x)))
    return tuple(out)


def _format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# --- the paths ----------------------------------------------------------------------------


def eager(model, xs, training):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = model(*xs)
    y.backward(_cotangent(y))
    grads = {f"dx{i}": x.grad for i, x in enumerate(xs)}
    grads.update(_short({n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    return {"y": y, **grads, **_state(model)}


def forward_mode_ad(model, xs, training):
    tangent = _cotangent(xs[0])
    with forward_ad.dual_level():
        y = model(forward_ad.make_dual(xs[0], tangent), *xs[1:])
        primal, out_tangent = forward_ad.unpack_dual(y)
    assert out_tangent is not None, "no tangent came out"
    return {"y": primal, "tangent": out_tangent, **_state(model)}


def func_jvp(model, xs, training):
    params = _params(model)
    y, tangent = torch.func.jvp(lambda x: functional_call(model, params, (x, *xs[1:])), (xs[0],),
                                (_cotangent(xs[0]),))  # fmt: skip
    return {"y": y, "tangent": tangent, **_state(model)}


def func_grad(model, xs, training):
    y = model(*xs).detach()
    cot = _cotangent(y)
    grads = torch.func.grad(lambda p: (functional_call(model, p, xs) * cot).sum())(_params(model))
    return _short(grads)


def func_jacfwd(model, xs, training):
    """Forward mode vmapped over the weight's basis: the Jacobian of the output in the weight."""
    params = _params(model)
    name = next(n for n in params if n.endswith("weight"))

    def out(w):
        return functional_call(model, {**params, name: w}, xs)

    return {"jacobian": torch.func.jacfwd(out)(params[name])}


def func_jacrev(model, xs, training):
    params = _params(model)
    cot = _cotangent(model(*xs).detach())
    jac = torch.func.jacrev(lambda p: (functional_call(model, p, xs) * cot).sum())(params)
    return _short(jac)


def func_per_sample_grads(model, xs, training):
    """torch.func's recipe: replace_all_batch_norm_modules_, then vmap(grad(functional_call))."""
    torch.func.replace_all_batch_norm_modules_(model)
    params = _params(model)
    cot = _cotangent(xs[0])

    def loss(p, *sample):
        return (functional_call(model, p, tuple(s.unsqueeze(0) for s in sample[:-1])) * sample[-1]).sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, *[0] * (len(xs) + 1)))(params, *xs, cot)
    return _short(grads)


def func_vmap(model, xs, training):
    """vmap over a stack of batches (eval: no running statistics written)."""
    stacked = [torch.stack([x, x.flip(0)]) for x in xs]
    return {"y": torch.func.vmap(model)(*stacked)}


def jit_trace(model, xs, training):
    traced = torch.jit.trace(copy.deepcopy(model), xs, check_trace=False)
    fresh = tuple(x.requires_grad_() for x in _new_inputs(xs))
    y = traced(*fresh)
    y.backward(_cotangent(y))
    return {"y": y, "dx": fresh[0].grad, **_state(traced)}


def jit_script(model, xs, training):
    scripted = torch.jit.script(copy.deepcopy(model))
    fresh = tuple(x.requires_grad_() for x in _new_inputs(xs))
    y = scripted(*fresh)
    y.backward(_cotangent(y))
    return {"y": y, "dx": fresh[0].grad, **_state(scripted)}


def fx_symbolic_trace(model, xs, training):
    holder = Holder(copy.deepcopy(model))
    traced = torch.fx.symbolic_trace(holder, concrete_args={"residual": None} if len(xs) == 1 else None)
    if not type(model).__module__.startswith("torchvision"):  # its FrozenBatchNorm2d is traced into, to constants
        assert traced.state_dict().keys() == holder.state_dict().keys(), "the traced model's state_dict keys differ"
    return eager(traced, xs, training)


def onnx_torchscript(model, xs, training):
    return _onnx(model, xs, dynamo=False)


def onnx_dynamo(model, xs, training):
    return _onnx(model, xs, dynamo=True)


def fresh_output(model, xs, training):
    """What a path that runs the model on new inputs must give: the eager output."""
    return {"y": model(*_new_inputs(xs))}


def _onnx(model, xs, dynamo: bool):
    import onnx
    import onnxruntime

    buffer = io.BytesIO()
    names = [f"x{i}" for i in range(len(xs))]
    if dynamo:
        program = torch.onnx.export(model, xs, input_names=names, dynamo=True, verbose=False)
        program.save(buffer)
    else:
        torch.onnx.export(model, xs, buffer, input_names=names, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert len(graph.input) == len(xs), f"the exported graph takes {len(graph.input)} inputs"
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" in ops or {"Mul", "Add"} <= ops, f"no batch norm in the graph: {sorted(ops)}"
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    fresh = _new_inputs(xs)
    (y,) = session.run(None, {n: x.contiguous().numpy() for n, x in zip(names, fresh, strict=True)})
    return {"y": torch.from_numpy(y)}


def export_decomposed(model, xs, training):
    program = torch.export.export(copy.deepcopy(model), xs).run_decompositions()
    ops = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert not [op for op in ops if op.startswith("batchnorm.")], f"custom ops left: {ops}"
    return {"y": program.module()(*_new_inputs(xs))}


def compile_fullgraph(model, xs, training):
    torch._dynamo.reset()  # each cell is a new layer; recompiling one code object 8 times would hit the limit
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    return eager(compiled, xs, training)


def _smaller_batch_first(model, xs) -> None:
    with torch.no_grad():
        model(*[x.detach()[: max(2, len(x) // 2)] for x in xs])


def compile_dynamic(model, xs, training):
    """Compiled for any batch size: a smaller batch first, then the inputs."""
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    _smaller_batch_first(compiled, xs)
    return eager(compiled, xs, training)


def smaller_batch_then_eager(model, xs, training):
    """What ``compile_dynamic`` runs, eagerly (torch's layer, the reference)."""
    _smaller_batch_first(model, xs)
    return eager(model, xs, training)


def swa_update_bn(model, xs, training):
    batches = [xs[0], xs[0] * 0.5 + 1.0]
    torch.optim.swa_utils.update_bn(batches, model)
    return {**_state(model), "y": model(xs[0])}


def autocast_bfloat16(model, xs, training):
    """BN fed by a bfloat16 conv/linear under CPU autocast, as AMP produces it."""
    producer = _producer(xs[0])
    x = xs[0].detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = producer(x)
        assert h.dtype == torch.bfloat16
        y = model(h, *xs[1:])
    y.float().backward(_cotangent(y).float())
    grads = _short({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return {"y": y.float(), "dx": x.grad, **grads, **_state(model)}


def _producer(x: Tensor) -> nn.Module:
    channels = x.shape[1]
    layer = nn.Linear(channels, channels) if x.dim() == 2 else getattr(nn, f"Conv{x.dim() - 2}d")(channels, channels, 1)
    torch.manual_seed(3)
    layer.reset_parameters()
    return layer


def inference_mode(model, xs, training):
    with torch.inference_mode():
        y = model(*xs)
    return {"y": y.clone(), **{k: v.clone() for k, v in _state(model).items()}}


def data_parallel(model, xs, training):
    return eager(nn.DataParallel(model), xs, training)


def half(model, xs, training):
    model = copy.deepcopy(model).half()
    return {"y": model(*(x.half() for x in xs)).float(), **_state(model)}


def frozen_parameters(model, xs, training):
    for p in model.parameters():
        p.requires_grad_(False)
    return eager(model, xs, training)


def copies(model, xs, training):
    """deepcopy, pickle and torch.save of the whole model: each copy computes what the model does."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    made = {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buffer, weights_only=False),
    }
    return {f"y {how}": m(*xs) for how, m in made.items()}


def gradcheck(model, xs, training):
    model = copy.deepcopy(model).double()
    inputs = tuple(x.double().requires_grad_() for x in xs)
    assert torch.autograd.gradcheck(lambda *a: model(*a), inputs)  # check_batched_grad as torch's default
    return {}


@dataclass(frozen=True)
class Path:
    fn: Callable
    readme: str  # the path, as the README's compatibility table names it
    how: str  # what our layer does there, as the table says
    note: str = ""  # where it stops, as the table says
    modes: tuple[str, ...] = ("train", "eval")
    backends: tuple[str, ...] = ALL_BACKENDS
    sizes: tuple[str, ...] = ("small", "large")
    skip_kinds: tuple[str, ...] = ()
    needs_spatial: bool = False
    single_input: bool = False  # the path feeds one tensor (no residual)
    expect_error: dict[str, str] | None = None  # kind -> message of the error ours raises (as torch's does)
    ctor: dict | None = None  # constructor keywords for both layers
    tolerance: float = 1e-4
    frozen: bool = True  # applies to frozen layers (whose parameters are constants)
    reference: Callable | None = None  # what torch's layer runs instead (default: the same path)

    def applies(self, kind: Kind) -> bool:
        if kind.frozen and not self.frozen:
            return False
        return (
            kind.name not in self.skip_kinds
            and (kind.spatial or not self.needs_spatial)
            and not (self.single_input and kind.residual)
        )


KERNELS = "our kernels (torch's kernel below 256K elements)"
TORCH_OPS = "torch's own ops, chosen automatically"
CAPTURED = "in training with running statistics torch's layer fails (captured buffers); ours says what to do"
HEAVY = ("auto", "numba")  # the forced backend must not matter either

# fmt: off
PATHS: dict[str, Path] = {
    "eager": Path(eager, "forward and backward", KERNELS),
    "forward_ad": Path(forward_mode_ad, "forward-mode AD (`torch.autograd.forward_ad`)", TORCH_OPS),
    "func_jvp": Path(func_jvp, "`torch.func.jvp`", TORCH_OPS, note=CAPTURED),
    "func_grad": Path(func_grad, "`torch.func.grad` over `functional_call`", TORCH_OPS, CAPTURED, frozen=False),
    "func_jacfwd": Path(func_jacfwd, "`torch.func.jacfwd`", TORCH_OPS, CAPTURED, sizes=("small",), frozen=False),
    "func_jacrev": Path(func_jacrev, "`torch.func.jacrev`", TORCH_OPS, CAPTURED, frozen=False),
    "func_per_sample_grads": Path(
        func_per_sample_grads, "`vmap(grad(functional_call))` per-sample gradients", TORCH_OPS, needs_spatial=True
    ),
    "func_vmap": Path(func_vmap, "`torch.func.vmap`", TORCH_OPS,
                      "in training with running statistics torch fails; ours says what to do", modes=("eval",)),
    "jit_trace": Path(jit_trace, "`torch.jit.trace`", TORCH_OPS),
    "jit_script": Path(
        jit_script, "`torch.jit.script`", "compiles torch's ops",
        "SyncBatchNorm: refused, as torch's, saying how to revert it",
        backends=("auto",),
        expect_error={"sync": "cannot be compiled by torch.jit.script"},
    ),
    "fx_symbolic_trace": Path(fx_symbolic_trace, "`torch.fx.symbolic_trace`", "one `call_module` node, as torch's"),
    "onnx_torchscript": Path(
        onnx_torchscript, "`torch.onnx.export(dynamo=False)` + onnxruntime", "ONNX `BatchNormalization`",
        modes=("eval",), backends=HEAVY, reference=fresh_output, tolerance=1e-5,
    ),
    "onnx_dynamo": Path(
        onnx_dynamo, "`torch.onnx.export(dynamo=True)` + onnxruntime", "ONNX `BatchNormalization`",
        modes=("eval",), backends=("auto",), sizes=("large",), reference=fresh_output, tolerance=1e-5,
    ),
    "export": Path(
        export_decomposed, "`torch.export` + `run_decompositions()`", "aten ops only: loads without this package",
        backends=HEAVY, reference=fresh_output,
    ),
    "compile": Path(
        compile_fullgraph, "`torch.compile(fullgraph=True)`", "one custom op per layer, no graph break",
        backends=("auto",), skip_kinds=("bn1d-ncl", "bn3d", "bn2d-nhwc", "sync", "frozen"), reference=eager,
    ),
    "compile_dynamic": Path(
        compile_dynamic, "`torch.compile(dynamic=True, fullgraph=True)`", "any batch size, no graph break",
        backends=("auto",), skip_kinds=("bn1d-ncl", "bn3d", "bn2d-nhwc", "sync", "frozen"),
        reference=smaller_batch_then_eager,
    ),
    "swa_update_bn": Path(
        swa_update_bn, "`torch.optim.swa_utils.update_bn`", KERNELS, modes=("train",), single_input=True,
        frozen=False,
    ),
    "autocast_bf16": Path(autocast_bfloat16, "`torch.autocast('cpu', torch.bfloat16)`", KERNELS, tolerance=3e-2),
    "inference_mode": Path(inference_mode, "`torch.inference_mode()`", KERNELS),
    "data_parallel": Path(data_parallel, "`nn.DataParallel` on CPU", KERNELS),
    "half": Path(half, "`model.half()` on CPU", KERNELS, tolerance=2e-2),
    "frozen": Path(frozen_parameters, "frozen parameters (`requires_grad_(False)`)", KERNELS),
    "no_running_stats": Path(
        eager, "`track_running_stats=False`", KERNELS, ctor={"track_running_stats": False}, frozen=False
    ),
    "affine_false": Path(eager, "`affine=False`", KERNELS, ctor={"affine": False}, frozen=False),
    "copies": Path(copies, "`copy.deepcopy`, pickle, `torch.save` of the whole model", KERNELS),
    "gradcheck": Path(
        gradcheck, "`gradcheck` (batched gradients included)", KERNELS, sizes=("small",), skip_kinds=("bn3d",)
    ),
}
# fmt: on


# paths checked by their own tests rather than the matrix: (path, how, the test that checks it)
OTHER_PATHS = [
    ("`torch.ao.quantization.fuse_modules` / `fuse_modules_qat`", "fused into the conv as torch's",
     "test_quantization.py::test_fuse_modules_fuses_our_layers_as_torchs"),
    ("`prepare_fx` / `prepare_qat_fx` / `convert_fx`",
     "runs; with `backend_config=batchnorm.quantization.backend_config()` quantized exactly as torch's",
     "test_quantization.py::test_prepare_fx_runs_on_our_layers_and_with_our_config_quantizes_as_torchs"),
    ("torchvision `create_feature_extractor`", "one `call_module` node, as torch's",
     "test_quantization.py::test_symbolic_trace_and_feature_extractor_keep_our_layers_whole"),
    ("torchvision and timm models after `convert` (float64, float32, channels-last)", "same numbers, 3 SGD steps",
     "test_zoo.py::test_converted_model_computes_what_the_original_does"),
    ("torch's generic module checks (`TestModule`)", "pass", "test_torch_module_checks.py"),
]  # fmt: skip


def compatibility_table() -> str:
    """The README's compatibility table: every path of the matrix, then the ones tested on their own."""
    lines = ["| path | with our layers | where it stops |", "|---|---|---|"]
    lines += [f"| {path.readme} | {path.how} | {path.note} |" for path in PATHS.values()]
    lines += [f"| {path} | {how} | |" for path, how, _ in OTHER_PATHS]
    return "\n".join(lines)
