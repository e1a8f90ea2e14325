"""torchvision and timm for the tests, on a CPU build of torch.

PyPI's torchvision wheel for this torch is a CUDA build whose C extension does
not load next to the CPU torch; its pure-Python models import once the two
operator schemas its import registers fakes for (``nms``, ``qnms``) exist.
Where the extension loads, nothing is defined here.
"""

from __future__ import annotations

import importlib
import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: dropping it would unregister the schemas


def torchvision():
    """``import torchvision``, defining the two schemas first if its C extension cannot load."""
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return importlib.import_module("torchvision")


def timm():
    torchvision()  # timm imports torchvision
    return importlib.import_module("timm")
