"""torchvision and timm for the tests, on a CPU build of torch (see ``batchnorm._torchvision``)."""

from __future__ import annotations

import importlib

from batchnorm import _torchvision


def torchvision():
    return _torchvision.load()


def timm():
    torchvision()  # timm imports torchvision
    return importlib.import_module("timm")
