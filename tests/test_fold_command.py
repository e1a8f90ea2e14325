"""``batchnorm fold MODEL.pt2 -o OUT.pt2``: the saved program loses its batch norms and keeps its outputs;
a missing file, a file that is no program, a program without batch norm, an existing output each
stop the command with one line and a non-zero exit, writing nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from batchnorm.cli import main


def _with_statistics(model: nn.Module) -> nn.Module:
    """``model`` in eval, its batch norms with running statistics and affine parameters far from the defaults."""
    generator = torch.Generator().manual_seed(0)
    for layer in model.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            c = layer.num_features
            layer.running_mean.copy_(torch.randn(c, generator=generator))
            layer.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if layer.affine:
                layer.weight.data.copy_(torch.randn(c, generator=generator))
                layer.bias.data.copy_(torch.randn(c, generator=generator))
    return model.eval()


def conv_net() -> nn.Module:
    return _with_statistics(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                          nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4)))  # fmt: skip


def mlp() -> nn.Module:
    return _with_statistics(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)))


def _save(model: nn.Module, x: torch.Tensor, path) -> str:
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return str(path)


def _batch_norm_ops(program) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]


@pytest.mark.parametrize(("make", "shape", "folded"), [(conv_net, (2, 3, 10, 10), 2), (mlp, (5, 6), 1)])
def test_fold_removes_every_batch_norm_and_keeps_the_outputs(make, shape, folded, tmp_path, capsys):
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    source = _save(model, x, tmp_path / "model.pt2")
    assert _batch_norm_ops(torch.export.load(source))  # the test means something: there are some to fold
    assert main(["fold", source, "-o", str(tmp_path / "out.pt2"), "--repeats", "3"]) == 0
    program = torch.export.load(str(tmp_path / "out.pt2"))
    assert _batch_norm_ops(program) == []
    assert not [name for name in program.state_dict if "running" in name or "num_batches" in name]
    with torch.no_grad():
        for inputs in (x, torch.randn(shape)):  # the example inputs and others of their shape
            torch.testing.assert_close(program.module()(inputs), model(inputs), rtol=1e-5, atol=1e-5)
    out = capsys.readouterr().out
    assert f"folded {folded} batch norm(s)" in out
    assert "speedup" in out and "ms" in out and "saved" in out


def test_the_report_names_each_batch_norm_and_the_op_it_folded_into(tmp_path, capsys):
    source = _save(conv_net(), torch.randn(2, 3, 8, 8), tmp_path / "model.pt2")
    assert main(["fold", source, "-o", str(tmp_path / "out.pt2"), "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:4] == ["1", "folded", "into", "conv2d"] for line in lines)
    assert any(line.split()[:4] == ["4", "folded", "into", "conv2d_1"] for line in lines)


def test_a_batch_norm_after_no_conv_is_left_and_said_so(tmp_path, capsys):
    model = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 5, 5)
    source = _save(model, x, tmp_path / "model.pt2")
    assert main(["fold", source, "-o", str(tmp_path / "out.pt2"), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "folded 1 batch norm(s)" in out and "left 1" in out and "not a conv/linear op" in out
    program = torch.export.load(str(tmp_path / "out.pt2"))
    assert len(_batch_norm_ops(program)) == 1
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_program_with_dynamic_batch_stays_dynamic(tmp_path):
    model, x = mlp(), torch.randn(4, 6)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    assert main(["fold", str(tmp_path / "model.pt2"), "-o", str(tmp_path / "out.pt2"), "--repeats", "1"]) == 0
    folded = torch.export.load(str(tmp_path / "out.pt2")).module()
    y = torch.randn(9, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(y), model(y), rtol=1e-5, atol=1e-5)


def test_a_model_without_batch_norm_is_an_error_and_writes_nothing(tmp_path, capsys):
    source = _save(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(2, 4), tmp_path / "model.pt2")
    assert main(["fold", source, "-o", str(tmp_path / "out.pt2")]) == 1
    err = capsys.readouterr().err
    assert "has no batch norm" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt2").exists()


@pytest.mark.parametrize("content", [b"not a program", None])
def test_a_file_that_is_not_a_program_is_one_line(content, tmp_path, capsys):
    source = tmp_path / "weights.pt2"
    if content is None:  # a zip archive, but torch.save's
        torch.save({"w": torch.ones(3)}, source)
    else:
        source.write_bytes(content)
    assert main(["fold", str(source), "-o", str(tmp_path / "out.pt2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("batchnorm: error:") and "is not a saved torch.export program" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.pt2").exists()


def test_an_existing_output_is_kept_without_force(tmp_path, capsys):
    source = _save(mlp(), torch.randn(5, 6), tmp_path / "model.pt2")
    out = tmp_path / "out.pt2"
    out.write_bytes(b"mine")
    assert main(["fold", source, "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"
    assert main(["fold", source, "-o", str(out), "--force", "--repeats", "1"]) == 0
    assert _batch_norm_ops(torch.export.load(str(out))) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging file left


def test_an_output_in_a_missing_folder_is_an_error(tmp_path, capsys):
    source = _save(mlp(), torch.randn(5, 6), tmp_path / "model.pt2")
    assert main(["fold", source, "-o", str(tmp_path / "no" / "out.pt2")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_missing_file_through_a_real_process_is_one_line_and_exit_1(tmp_path):
    missing = tmp_path / "missing.pt2"
    command = [sys.executable, "-m", "batchnorm.cli", "fold", str(missing), "-o", str(tmp_path / "o.pt2")]
    env = {**os.environ, "BATCHNORM_DEBUG": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"batchnorm: error: {missing}: no such file"]
    assert not (tmp_path / "o.pt2").exists()
