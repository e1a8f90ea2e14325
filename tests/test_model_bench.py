"""The whole-model modes of ``batchnorm bench``: torchvision's ResNets, torch's layers against
ours after convert, fuse and fold; batch norm's share of the time by ablation."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import _torchvision, benchmark, model_bench

try:
    _torchvision.load()
except ImportError:  # installed with the test extras: this skip is for a bare checkout
    pytest.skip("torchvision is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def _norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_without_norm_takes_out_every_batch_norm_and_keeps_the_rest():
    model = model_bench.build("resnet18").eval()
    ablated = model_bench.without_norm(model)
    assert len(_norms(model)) == 20 and not _norms(ablated)  # the model itself is untouched
    # what is left is the same network with x -> x where each batch norm was
    expected = model_bench.build("resnet18").eval()
    for name, module in list(expected.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(expected.get_submodule(parent) if parent else expected, child, nn.Identity())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ablated(x), expected(x))


def test_without_norm_keeps_a_fused_layers_residual_add_and_activation():
    fused = batchnorm.BatchNorm2d(4, activation="leaky_relu")
    ablated = model_bench.without_norm(nn.Sequential(fused))[0]
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ablated(x, r), nn.functional.leaky_relu(x + r, 0.01))
    torch.testing.assert_close(ablated(x), nn.functional.leaky_relu(x, 0.01))


@pytest.mark.parametrize("mode", ["model-train", "model-eval"])
@pytest.mark.parametrize("model", ["resnet18", "tiny-resnet"])
def test_each_variant_is_timed_against_torch_with_its_batch_norm_share(mode, model):
    rows = model_bench.bench_model(model, mode, batch=2, size=32, repeats=2)
    expected = model_bench.EVAL_VARIANTS if mode == "model-eval" else model_bench.TRAIN_VARIANTS
    assert [r.variant for r in rows] == list(expected)
    for r in rows:
        assert r.model == model and r.mode == mode and r.ms > 0 and r.no_bn_ms > 0
        assert r.vs_torch == pytest.approx(r.torch_ms / r.ms) and 0.0 <= r.bn_share < 1.0
    assert rows[0].vs_torch == 1.0


def test_a_variant_that_computes_something_else_is_an_error(monkeypatch):
    """Before timing, each variant's logits are checked against torch's from the same weights."""
    real = model_bench.variants

    def broken(model, mode):
        models = real(model, mode)
        with torch.no_grad():
            next(m for m in models["fuse"].modules() if isinstance(m, batchnorm.BatchNorm2d)).bias.add_(1.0)
        return models

    monkeypatch.setattr(model_bench, "variants", broken)
    with pytest.raises(AssertionError, match="resnet18 model-eval: fuse's logits differ from torch's"):
        model_bench.bench_model("resnet18", "model-eval", batch=2, size=32, repeats=1)


def test_summary_speaks_to_the_targets():
    def row(mode, variant, ms, torch_ms=100.0, no_bn=60.0):
        return model_bench.ModelRow("resnet50", mode, variant, ms, torch_ms, no_bn, 1.0)

    rows = [row("model-train", "torch", 100.0), row("model-train", "convert", 90.0),
            row("model-train", "fuse", 75.0), row("model-eval", "torch", 100.0),
            row("model-eval", "convert", 104.0), row("model-eval", "fold", 80.0)]  # fmt: skip
    train, evals = model_bench.summary(rows)
    assert train == ("- resnet50 training step: fuse 1.33x torch (target >= 1.3x: met), convert 1.11x; "
                     "batch norm's share of the step: torch 40%, fuse 20%")  # fmt: skip
    assert evals == ("- resnet50 eval forward: convert 0.96x, fold 1.25x torch "
                     "(target: none slower than torch: not met, convert)")  # fmt: skip


def test_bench_runs_the_model_modes_alone_and_writes_them(tmp_path, capsys):
    args = parse("--modes", "model-eval", "--models", "resnet18", "--dry-run", "--out", str(tmp_path))
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    assert "| case |" not in printed  # no layer table
    assert "### Whole models: ResNets, batch 2, 3x32x32" in printed
    for variant in model_bench.EVAL_VARIANTS:
        assert f"| resnet18 | model-eval | {variant} |" in printed
    table = (tmp_path / "results.md").read_text()
    assert "| resnet18 | model-eval | fold |" in table and "- resnet18 eval forward: convert " in table


def test_model_options_are_checked_before_any_work(capsys):
    from batchnorm import cli

    assert cli.main(["bench", "--modes", "model-train", "--models", "vgg11"]) == 2
    assert "--models: unknown model 'vgg11'; expected some of resnet18, resnet50" in capsys.readouterr().err
    assert cli.main(["bench", "--modes", "model-train", "--image-size", "0"]) == 2
    assert "--image-size must be a positive integer, got 0" in capsys.readouterr().err
