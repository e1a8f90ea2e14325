"""batchnorm: batch normalization for PyTorch, complete and fast.

Drop-in ``BatchNorm1d/2d/3d`` layers (subclasses of torch.nn's) with optional
fused activation and residual add, ``SyncBatchNorm``, the functional
``batch_norm``, backend choice (``backend``), ``convert`` to swap the layers of
an existing model, ``fuse`` to fuse what follows them, ``freeze``/``fold``
to collapse them for inference, ``precise_statistics``/``population_moments``/``accumulate``
for population statistics computed exactly, ``adapt`` for test-time adaptation
(AdaBN, TENT), and Batch Renormalization
(``BatchRenorm1d/2d/3d``). See
``batchnorm.reference`` for the equations.
"""

from . import functional, quantization, reference
from .adaptation import adapt
from .convert import convert
from .fold import FoldReport, FrozenBatchNorm, fold, freeze
from .fuse import fuse
from .kernels import backend
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .population import accumulate, population_moments, precise_statistics
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
    "FoldReport", "FrozenBatchNorm", "SyncBatchNorm", "accumulate", "adapt", "backend",
    "convert", "fold", "freeze", "functional", "fuse", "population_moments", "precise_statistics", "quantization",
    "reference",
]  # fmt: skip
__version__ = "0.1.0"

quantization.register()  # torch.ao's eager fusion finds fuser methods by exact class
