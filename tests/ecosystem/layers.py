"""The layers of the ecosystem matrix: each of ours next to torch's equivalent, and their inputs.

A :class:`Kind` builds a pair ``(ours, theirs)`` holding the same parameters and
running statistics (random, not the defaults, so that eval and the backward use
them), and random inputs of a size below or above the small-input threshold
(below it our layer runs torch's own kernel; above it our kernels, which is
where tools that cannot see into them used to fail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

import batchnorm
from batchnorm.kernels.cpu.backend import SMALL_NUMEL
from tests.ecosystem import vision


class ReluAfter(nn.Module):
    """torch's counterpart of a fused layer: ``relu(bn(x) [+ residual])``."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(x)
        return torch.relu(y if residual is None else y + residual)


def _randomize(layer: nn.Module) -> None:
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.uniform_(0.5, 1.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)
        if layer.running_mean is not None:
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.8, 1.6)
            layer.num_batches_tracked.fill_(3)


@dataclass(frozen=True)
class Kind:
    name: str
    torch_cls: type[nn.Module]
    ours_cls: type[nn.Module]
    shapes: dict[str, tuple[int, ...]]  # size -> input shape
    activation: str | None = None
    residual: bool = False
    channels_last: bool = False
    spatial: bool = True  # a sample alone has more than one value per channel
    frozen: bool = False  # eval only: no running statistics, no parameters
    kwargs: dict = field(default_factory=dict)

    def pair(self, **kwargs) -> tuple[nn.Module, nn.Module]:
        """``(ours, theirs)`` with the same random state; ``theirs`` is ``torch.nn``'s (torchvision's
        ``FrozenBatchNorm2d`` for a frozen layer)."""
        kwargs = {**self.kwargs, **kwargs}
        channels = self.shapes["small"][1]
        bn = self.torch_cls(channels, **kwargs)
        _randomize(bn)
        if self.frozen:
            theirs = vision.torchvision().ops.FrozenBatchNorm2d(channels)
            theirs.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
            return batchnorm.FrozenBatchNorm.from_batch_norm(bn.eval()), theirs
        ours = self.ours_cls(channels, activation=self.activation, **kwargs)
        ours.load_state_dict(bn.state_dict())
        theirs = ReluAfter(bn) if self.activation == "relu" else bn
        return ours, theirs

    def inputs(self, size: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
        shape = self.shapes[size]
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        return (x, torch.randn(shape, dtype=dtype)) if self.residual else (x,)


LARGE = math.isqrt(SMALL_NUMEL // 16) + 2  # a side that puts 2 x 8 x side^2 above the threshold
KINDS = [
    Kind("bn1d", nn.BatchNorm1d, batchnorm.BatchNorm1d, {"small": (16, 64), "large": (SMALL_NUMEL // 64 + 8, 64)},
         spatial=False),
    Kind("bn1d-ncl", nn.BatchNorm1d, batchnorm.BatchNorm1d,
         {"small": (4, 8, 9), "large": (4, 8, SMALL_NUMEL // 32 + 5)}),
    Kind("bn2d", nn.BatchNorm2d, batchnorm.BatchNorm2d, {"small": (4, 8, 5, 7), "large": (2, 8, LARGE, LARGE)}),
    Kind("bn2d-nhwc", nn.BatchNorm2d, batchnorm.BatchNorm2d, {"small": (4, 8, 5, 7), "large": (2, 8, LARGE, LARGE)},
         channels_last=True),
    Kind("bn3d", nn.BatchNorm3d, batchnorm.BatchNorm3d, {"small": (2, 4, 3, 5, 4),
                                                          "large": (2, 4, 8, LARGE // 2, LARGE)}),
    Kind("bn2d-relu", nn.BatchNorm2d, batchnorm.BatchNorm2d, {"small": (4, 8, 5, 7), "large": (2, 8, LARGE, LARGE)},
         activation="relu"),
    Kind("bn2d-add-relu", nn.BatchNorm2d, batchnorm.BatchNorm2d,
         {"small": (4, 8, 5, 7), "large": (2, 8, LARGE, LARGE)}, activation="relu", residual=True),
    Kind("sync", nn.BatchNorm2d, batchnorm.SyncBatchNorm, {"small": (4, 8, 5, 7), "large": (2, 8, LARGE, LARGE)}),
    Kind("frozen", nn.BatchNorm2d, batchnorm.FrozenBatchNorm, {"small": (4, 8, 5, 7), "large": (2, 8, LARGE, LARGE)},
         frozen=True),
]  # fmt: skip
BY_NAME = {kind.name: kind for kind in KINDS}


def check_sizes() -> None:
    for kind in KINDS:
        assert math.prod(kind.shapes["small"]) <= SMALL_NUMEL < math.prod(kind.shapes["large"]), kind.name
