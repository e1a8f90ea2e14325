"""``import torchvision`` where its C extension cannot load (for ``batchnorm bench``'s model modes
and the tests).

PyPI's torchvision wheel for a given torch is a CUDA build; next to a CPU build of torch
its C extension does not load, and its import stops where it registers fakes for the
``torchvision::nms`` and ``qnms`` operators. Its pure-Python models (the ResNets we time)
need neither: once those two schemas exist, the import completes. Where the extension
loads, nothing is defined.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: dropping it would unregister the schemas


def load() -> ModuleType:
    """``torchvision``, defining the two schemas first if its C extension cannot load; raises
    ImportError where torchvision is not installed."""
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _library.define(schema)
    return importlib.import_module("torchvision")
