"""A ResNet-style client: torchvision-style basic and bottleneck blocks, written out
here (torchvision is not a dependency) the way torchvision writes them, with the
batch-norm class and the activation (a factory; in-place ReLU by default) as
parameters. The tests train it with ours and torch's layers side by side;
``batchnorm bench`` measures its training step's memory before and after
``batchnorm.fuse``."""

from __future__ import annotations

from torch import nn


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm=nn.BatchNorm2d, activation=_relu):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm(planes)
        self.relu = activation()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm=nn.BatchNorm2d, activation=_relu):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = activation()
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride, bias=False), norm(planes * self.expansion)
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem, three basic blocks (one downsampling) and a bottleneck: 11 batch norms."""

    def __init__(self, norm=nn.BatchNorm2d, classes: int = 5, activation=_relu):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), norm(8), activation())
        self.layers = nn.Sequential(
            BasicBlock(8, 8, 1, norm, activation),
            BasicBlock(8, 16, 2, norm, activation),
            BasicBlock(16, 16, 1, norm, activation),
            Bottleneck(16, 4, 1, norm, activation),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))
