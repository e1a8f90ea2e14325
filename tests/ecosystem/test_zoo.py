"""Real models, converted: torchvision's and timm's networks (random weights, small images)
computing what the original does, in eval and over three training steps side by side.

Each model is built twice from one seed; one copy is converted to our layers.
Eval outputs, three SGD steps' losses, and every parameter and buffer after
them are compared, in float64 and float32, channels-last too, with the
automatic backend choice and with the numba backend forced (so that every
layer, however small, runs our kernels).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm
from tests.ecosystem import vision
from tests.helpers import assert_close

BUILDERS = {
    "resnet18": lambda: vision.torchvision().models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: vision.torchvision().models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: vision.torchvision().models.efficientnet_b0(num_classes=10),
    "densenet121": lambda: vision.torchvision().models.densenet121(num_classes=10),
    "regnet_y_400mf": lambda: vision.torchvision().models.regnet_y_400mf(num_classes=10),
    "timm-efficientnet_b0": lambda: vision.timm().create_model("efficientnet_b0", num_classes=10),
    "timm-resnet26d": lambda: vision.timm().create_model("resnet26d", num_classes=10),
}
# (dtype, memory format, backend)
SETTINGS = {
    "float64": (torch.float64, torch.contiguous_format, "auto"),
    "float64-numba": (torch.float64, torch.contiguous_format, "numba"),
    "float64-nhwc-numba": (torch.float64, torch.channels_last, "numba"),
    "float32": (torch.float32, torch.contiguous_format, "auto"),
    "float32-numba": (torch.float32, torch.contiguous_format, "numba"),
    "float32-nhwc-numba": (torch.float32, torch.channels_last, "numba"),
}
OTHER_FORMAT = {torch.contiguous_format: torch.channels_last, torch.channels_last: torch.contiguous_format}
IMAGE = (4, 3, 64, 64)
STEPS = 3


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name]()
    with torch.no_grad():  # running statistics away from their defaults, so eval uses them
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    return model


def _count(model: nn.Module, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _data(dtype, memory_format):
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(IMAGE, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
              for _ in range(STEPS + 1)]  # fmt: skip
    labels = [torch.randint(0, 10, (IMAGE[0],), generator=gen) for _ in range(STEPS)]
    return images, labels


def _step(model: nn.Module, x, y, context) -> dict[str, torch.Tensor]:
    """One training step's loss and gradients (the step itself is the caller's)."""
    model.train()
    model.zero_grad()
    torch.manual_seed(0)  # the same dropout and stochastic-depth draws for both models
    with context():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    return {"loss": loss.detach(), **{f"grad of {n}": p.grad for n, p in model.named_parameters()}}


def _eval(model: nn.Module, x, context) -> torch.Tensor:
    model.eval()
    with context(), torch.no_grad():
        return model(x)


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_converted_model_computes_what_the_original_does(name, setting):
    """float64: three SGD steps side by side; every loss, gradient, parameter and buffer equal to 1e-7.

    float32: the gradients of these freshly initialized deep networks are badly conditioned (a
    convolution followed by batch norm has a gradient that is a small difference of large terms,
    and a max-pool tie or a ReLU input at zero decided the other way moves it by percents: torch's
    own float32 runs in the two memory formats part so), and the difference grows with every
    step. So in float32 each step starts both models from torch's state, and the well-conditioned
    quantities (the loss, the running statistics after the step, the eval logits) of ours must be
    as close to that step's float64 result as torch's own float32 results are, in either memory
    format (within 3x, or 1e-5 of the quantity's scale); gradients and parameters are compared
    exactly in float64."""
    dtype, memory_format, backend = SETTINGS[setting]
    theirs = _build(name).to(dtype=dtype, memory_format=memory_format)
    total = _count(theirs, nn.modules.batchnorm._BatchNorm)
    ours = copy.deepcopy(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left behind
        batchnorm.convert(ours)
    assert total > 0 and _count(ours, batchnorm.modules._BatchNorm) == total  # every layer converted

    def forced():
        return contextlib.nullcontext() if backend == "auto" else batchnorm.backend(backend)

    exact = dtype == torch.float64
    images, labels = _data(dtype, memory_format)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9)
    for step in range(STEPS + 1):
        if not exact:  # this step from torch's state, with a float64 twin of it as the yardstick
            ours.load_state_dict(theirs.state_dict())
            opt_ours.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))  # else the two share momentum
            twin = copy.deepcopy(theirs).double()
            opt_twin = torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9)
            opt_twin.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))
            other = copy.deepcopy(theirs).to(memory_format=OTHER_FORMAT[memory_format])
            opt_other = torch.optim.SGD(other.parameters(), lr=0.01, momentum=0.9)
            opt_other.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))
            other_images = [x.contiguous(memory_format=OTHER_FORMAT[memory_format]) for x in images]
        if step == STEPS:  # the eval logits of the trained models
            got = {"eval logits": _eval(ours, images[-1], forced)}
            expected = {"eval logits": _eval(theirs, images[-1], contextlib.nullcontext)}
            if not exact:
                yardstick = {"eval logits": _eval(twin, images[-1].double(), contextlib.nullcontext)}
                spread = {"eval logits": _eval(other, other_images[-1], contextlib.nullcontext)}
        else:
            got = _step(ours, images[step], labels[step], forced)
            expected = _step(theirs, images[step], labels[step], contextlib.nullcontext)
            opt_ours.step(), opt_theirs.step()
            got.update({f"{k} after the step": v for k, v in ours.state_dict().items()})
            expected.update({f"{k} after the step": v for k, v in theirs.state_dict().items()})
            if not exact:
                yardstick = _step(twin, images[step].double(), labels[step], contextlib.nullcontext)
                opt_twin.step()
                yardstick.update({f"{k} after the step": v for k, v in twin.state_dict().items()})
                spread = _step(other, other_images[step], labels[step], contextlib.nullcontext)
                opt_other.step()
                spread.update({f"{k} after the step": v for k, v in other.state_dict().items()})
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            what = f"step {step}: {key}"
            if not value.is_floating_point():
                assert torch.equal(got[key], value), what
            elif exact:
                assert_close(got[key], value, 1e-7, 1e-7, what)
            elif key.startswith("grad of") or (("weight" in key or "bias" in key) and "after the step" in key):
                continue  # badly conditioned: float64 compares them exactly
            else:
                truth = yardstick[key]
                ours_error = (got[key].double() - truth).norm().item()
                torch_error = max((t.double() - truth).norm().item() for t in (value, spread[key]))
                floor = 1e-5 * truth.norm().item()
                assert ours_error <= 3 * torch_error + floor, (
                    f"{what}: ours is {ours_error:.2e} from the float64 result, torch's float32 {torch_error:.2e}"
                )


def test_timm_norm_act_layers_become_ours_with_the_activation_fused():
    theirs = BUILDERS["timm-efficientnet_b0"]()
    norm_act = [m for m in theirs.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert len(norm_act) == 49
    acts = sorted({type(m.act).__name__ for m in norm_act})
    ours, report = batchnorm.convert(copy.deepcopy(theirs), report=True)
    assert len(report.converted) == 49 and report.skipped == []
    fused = sorted({str(m.activation) for m in ours.modules() if isinstance(m, batchnorm.BatchNorm2d)})
    assert fused == sorted({"identity" if a == "Identity" else a.lower() for a in acts})
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("name", ["timm-efficientnet_b0", "resnet18"])
def test_fuse_keeps_the_state_dict_keys_and_the_numbers(name):
    """fuse must never change a model's state_dict keys: the model's own checkpoint still loads."""
    torch.manual_seed(0)
    theirs = BUILDERS[name]().eval()
    checkpoint = copy.deepcopy(theirs.state_dict())
    fused = batchnorm.fuse(copy.deepcopy(theirs))
    fused.load_state_dict(checkpoint)  # strict
    ours_layers = [m for m in fused.modules() if isinstance(m, batchnorm.BatchNorm2d)]
    assert ours_layers and any(m.activation.name != "identity" for m in ours_layers)  # something was fused
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(fused(x), theirs(x), 1e-4, 1e-4, "fused eval logits")


def test_convert_reports_what_it_leaves_and_warns():
    class Custom(nn.BatchNorm2d):  # a subclass with a forward of its own: not ours to replace
        def forward(self, x):
            return super().forward(x) * 2

    class Plain(nn.BatchNorm2d):  # keeps torch's forward: converted as a BatchNorm2d
        pass

    timm = vision.timm()
    gelu = timm.layers.BatchNormAct2d(4, act_layer=nn.GELU)
    model = nn.Sequential(nn.BatchNorm2d(4), Custom(4), Plain(4), gelu)
    with pytest.warns(UserWarning, match=r"left 2 batch-norm layer\(s\) as they were: 1 \(.*Custom\), 3 "):
        model, report = batchnorm.convert(model, report=True)
    assert [name for name, _, _ in report.converted] == ["0", "2"]
    assert type(model[2]) is batchnorm.BatchNorm2d and type(model[1]) is Custom and model[3] is gelu
    why = {name: reason for name, _, reason in report.skipped}
    assert "forward of its own" in why["1"] and "GELU cannot be fused" in why["3"]
    assert "left as it is" in str(report)
