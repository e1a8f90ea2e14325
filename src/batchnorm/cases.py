"""The one table of layer shapes that ``batchnorm bench`` times and the kernel tests walk.

A case is a batch-norm input: a name, a group, a shape ``(B, C, ...)`` with the
channel axis second, and its memory layout (NCHW or channels-last). The groups:

* ``resnet50``: the 12 distinct BatchNorm2d input shapes of torchvision's
  ResNet-50 (stem, then the four stages, the downsampling branches included),
  at a given batch and input side (224 by default), each in NCHW (``-nchw``)
  and channels-last (``-nhwc``): the layers a convolutional network spends
  its batch-norm time in;
* ``mlp``: ``(B, N)`` inputs of a BatchNorm1d after a linear layer;
* ``small``: shapes small enough that the cost per call, not the bandwidth,
  decides the time.

It lives in one place so that a figure the benchmark reports and a test that
checks our kernels speak of the same layers: the CPU and the GPU runs take
their cases from :func:`cases`, and the tests take every case through
:func:`shrink`, which keeps what makes a case distinct (its channel count, its
layout, whether it is ``(B, N)`` or an image) at a size a test can afford.
Names are stable: results quoted in the READMEs refer to them
(``r50-512x7-nhwc`` is ResNet-50's 512-channel 7x7 layer, channels-last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["GROUPS", "QUICK", "Case", "cases", "resnet50_shapes", "shrink"]

GROUPS = ("resnet50", "mlp", "small")

# (channels, downsampling steps) of each distinct BatchNorm2d input of ResNet-50: the side is
# the input side halved (rounding up, as the stride-2 convolutions and the max-pool do) that often.
RESNET50_LAYERS = (
    (64, 1),  # stem: 112 at 224
    (64, 2), (256, 2),  # stage 1: 56
    (128, 2), (128, 3), (512, 3),  # stage 2: its first block's 1x1 conv still sees 56, the rest 28
    (256, 3), (256, 4), (1024, 4),  # stage 3: 28, 14
    (512, 4), (512, 5), (2048, 5),  # stage 4: 14, 7
)  # fmt: skip
MLP = ((256, 1024), (4096, 4096))  # (batch, features)
SMALL = (  # (shape, channels-last)
    ((8, 16, 8, 8), False),
    ((32, 64), False),
    ((4, 32, 16, 16), True),
)
MODELS = ("resnet18", "resnet50")  # torchvision's, for the whole-model modes of batchnorm bench (the default)
OWN_MODELS = ("tiny-resnet",)  # batchnorm.experiments' ResNet-style net: no torchvision needed
QUICK = ("small-8x16x8x8", "small-32x64", "small-4x32x16x16-nhwc", "r50-2048x7-nhwc")  # seconds, for tests
SHRUNK_NUMEL = 50_000  # what shrink() makes of a case, at most


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # one of GROUPS
    shape: tuple[int, ...]  # (B, C, ...): channels second
    channels_last: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[1]


def resnet50_shapes(batch: int = 32, side: int = 224) -> list[tuple[int, int, int, int]]:
    """The distinct BatchNorm2d input shapes ``(batch, C, H, W)`` of ResNet-50 on ``side`` x ``side`` images."""
    shapes = []
    for channels, steps in RESNET50_LAYERS:
        s = side
        for _ in range(steps):
            s = -(-s // 2)
        shapes.append((batch, channels, s, s))
    return shapes


def cases(
    groups: tuple[str, ...] | list[str] = GROUPS, batch: int = 32, side: int = 224, channels_last: bool | None = None
) -> list[Case]:
    """The table, in its order: the ResNet-50 layers at ``batch`` and ``side`` (NCHW, then
    channels-last), the MLP shapes, the small shapes (those two fixed). ``channels_last``:
    ``None`` both layouts, ``True`` or ``False`` only that one."""
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown case group(s) {sorted(unknown)}; expected some of {', '.join(GROUPS)}")
    table: list[Case] = []
    if "resnet50" in groups:
        for last in (False, True):
            for shape in resnet50_shapes(batch, side):
                tag = "nhwc" if last else "nchw"
                table.append(Case(f"r50-{shape[1]}x{shape[2]}-{tag}", "resnet50", shape, last))
    if "mlp" in groups:
        table += [Case(f"mlp-{b}x{n}", "mlp", (b, n)) for b, n in MLP]
    if "small" in groups:
        for shape, last in SMALL:
            table.append(Case("small-" + "x".join(map(str, shape)) + ("-nhwc" if last else ""), "small", shape, last))
    return [c for c in table if channels_last is None or c.channels_last == channels_last]


def shrink(case: Case, max_numel: int = SHRUNK_NUMEL) -> Case:
    """``case`` at most ``max_numel`` elements: same name, group, channel count, layout and rank.

    A case that fits is returned as it is. An image case takes 2 images and halves its
    spatial sides (rounding up, as a stride-2 layer does) until it fits; a ``(B, N)`` case
    keeps as many rows as fit. Every channel keeps at least 2 values, so the variance is
    defined (a case with more than ``max_numel / 2`` channels cannot shrink that far and
    is refused).
    """
    if case.numel <= max_numel:
        return case
    b, c, *spatial = case.shape
    per_channel = max_numel // c  # values each channel may keep
    if per_channel < 2:
        raise ValueError(f"{case.name}: {c} channels do not fit in {max_numel} elements with 2 values each")
    if not spatial:
        b = max(2, min(b, per_channel))
    else:
        b = 2
        while b * math.prod(spatial) > per_channel and max(spatial) > 1:
            spatial = [-(-s // 2) for s in spatial]
    return replace(case, shape=(b, c, *spatial))
