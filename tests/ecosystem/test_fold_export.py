"""A model folded by ``batchnorm.fold`` exports with no batch norm left: ``torch.export`` and both ONNX exporters.

Folding is meant for deployment, so what counts is the exported artefact: after folding, the
program from ``torch.export`` (also after ``run_decompositions()``) holds no batch-norm op, and
the graphs of both ONNX exporters (TorchScript-based ``dynamo=False`` and ``dynamo=True``) hold
no ``BatchNormalization`` node, pass ``onnx.checker`` and give in onnxruntime what the eval model
gives in torch. The models are the zoo of ``tests/test_fold_zoo.py``: a ResNet, a
depthwise-separable net with our fused-ReLU layer, a U-Net with (grouped) ConvTranspose, whose one
unfoldable batch norm is frozen to a per-channel ``Mul``/``Add``, and an MLP with BatchNorm1d
before and after Linear. Controls show the same checks see a batch norm in the unfolded eval model
(the exporters fold a batch norm right after a Conv themselves, so the controls use models with
batch norms elsewhere).
"""

from __future__ import annotations

import io

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import batchnorm
from tests.helpers import assert_close
from tests.test_fold_zoo import _MobileNetBlock, _resnet, _trained, _UNet


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.BatchNorm1d(6), nn.Linear(6, 16), batchnorm.BatchNorm1d(16, activation="relu"),
        nn.BatchNorm1d(16), nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.Linear(16, 3),
    )  # fmt: skip


# name: (builder, input shape, batch norms it holds); every one folds except the U-Net's bn_before_up (frozen)
_ZOO = {
    "resnet": (lambda: _resnet(batchnorm.BatchNorm2d), (2, 3, 12, 12), 7),
    "depthwise_separable": (lambda: nn.Sequential(_MobileNetBlock(4, 6), _MobileNetBlock(6, 8)), (2, 4, 10, 10), 8),
    "unet": (_UNet, (2, 3, 8, 8), 5),
    "mlp": (_mlp, (5, 6), 4),
}
_DYNAMO = ["depthwise_separable", "unet", "mlp"]  # the dynamo exporter is slow: three models
_CONTROLS = ["depthwise_separable", "unet", "mlp"]  # their batch norms are not right after a Conv


def _model(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The eval model (trained a little, random gamma/beta), its fold, and an input to export with."""
    build, shape, count = _ZOO[name]
    torch.manual_seed(0)
    model = _trained(build(), (8, *shape[1:]))
    folded, report = batchnorm.fold(model, report=True)
    assert len(report.entries) == count, str(report)
    expected_frozen = ["bn_before_up"] if name == "unet" else []
    assert [e.batch_norm for e in report.frozen] == expected_frozen and not report.left, str(report)
    return model, folded, torch.randn(shape) * 1.5 + 0.5


def _aten_batch_norms(program: torch.export.ExportedProgram) -> list[str]:
    """The batch-norm ops in an exported program: aten.batch_norm, native_batch_norm, _native_batch_norm_legit*..."""
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    return [op for op in ops if "batch_norm" in op]


def _onnx_bytes(model: nn.Module, x: torch.Tensor, dynamo: bool) -> bytes:
    buffer = io.BytesIO()
    if dynamo:
        torch.onnx.export(model, (x,), input_names=["x"], dynamo=True, verbose=False).save(buffer)
    else:
        torch.onnx.export(model, (x,), buffer, input_names=["x"], dynamo=False)
    return buffer.getvalue()


def _onnx_ops(data: bytes) -> list[str]:
    """Every node's op type, subgraphs and local functions included."""
    model = onnx.load_from_string(data)
    graphs = [model.graph]
    ops = [node.op_type for function in model.functions for node in function.node]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            ops.append(node.op_type)
            for attribute in node.attribute:
                graphs += [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
    return ops


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to float32 rounding, relative to the output's scale (folding reorders the arithmetic)."""
    scale = expected.abs().max().item()
    assert_close(actual, expected, 1e-5 * scale, 1e-5, what)


@pytest.mark.parametrize("name", list(_ZOO))
def test_torch_export_of_the_folded_model_holds_no_batch_norm_and_matches_the_eval_model(name):
    model, folded, x = _model(name)
    fresh = torch.randn_like(x)  # not the example input: the program must not hold it as a constant
    with torch.no_grad():
        expected = model(fresh)
        program = torch.export.export(folded, (x,))
        for stage, prog in (("exported", program), ("decomposed", program.run_decompositions())):
            assert _aten_batch_norms(prog) == [], f"{stage}: {_aten_batch_norms(prog)}"
            _close(prog.module()(fresh), expected, f"{name}, {stage} program")


@pytest.mark.parametrize("name", list(_ZOO))
def test_control_torch_export_of_the_eval_model_holds_its_batch_norms(name):
    model, _, x = _model(name)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        assert len(_aten_batch_norms(program)) == _ZOO[name][2]
        assert len(_aten_batch_norms(program.run_decompositions())) == _ZOO[name][2]


@pytest.mark.parametrize(
    ("name", "dynamo"),
    [(name, False) for name in _ZOO] + [(name, True) for name in _DYNAMO],
    ids=lambda v: {False: "torchscript", True: "dynamo"}.get(v, v) if isinstance(v, bool) else v,
)
def test_onnx_export_of_the_folded_model_has_no_batch_normalization_and_runs_as_torch(name, dynamo):
    model, folded, x = _model(name)
    fresh = torch.randn_like(x)
    with torch.no_grad():
        expected, folded_y = model(fresh), folded(fresh)
        data = _onnx_bytes(folded, x, dynamo)
    ops = _onnx_ops(data)
    assert "BatchNormalization" not in ops, sorted(set(ops))
    if name == "unet":  # the frozen batch norm is a per-channel affine map
        assert {"Mul", "Add"} <= set(ops), sorted(set(ops))
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    _close(torch.from_numpy(y), folded_y, f"{name}: onnxruntime vs the folded model")
    _close(torch.from_numpy(y), expected, f"{name}: onnxruntime vs the eval model")


@pytest.mark.parametrize(
    ("name", "dynamo"),
    [(name, False) for name in _CONTROLS] + [("mlp", True)],
    ids=lambda v: {False: "torchscript", True: "dynamo"}.get(v, v) if isinstance(v, bool) else v,
)
def test_control_onnx_export_of_the_eval_model_has_batch_normalization(name, dynamo):
    model, _, x = _model(name)
    with torch.no_grad():
        expected = model(x)
        data = _onnx_bytes(model, x, dynamo)
    assert "BatchNormalization" in _onnx_ops(data)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    _close(torch.from_numpy(y), expected, f"{name}: onnxruntime vs the eval model")
