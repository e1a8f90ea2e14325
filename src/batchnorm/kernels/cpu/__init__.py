"""The ``numba`` backend: fused CPU kernels for float32/float64 tensors.

* ``backend``: :class:`NumbaBackend`, the launcher (layouts, views, outputs, work
  splits, which kernel for which activation) and the automatic-choice rule;
* ``loops``: the Numba kernels of plain batch norm (training forward and backward
  with the activation applied in the loops, eval);
* ``residual_loops``: the kernels of ``act(BN(x) + residual)``, with its sign mask;
* ``_helpers``: what the kernels share (block sums, finishing the statistics and the
  gradient coefficients, the activations' scalar forms, the per-activation factory);
* ``threads``: thread count, the parallel-launch lock, forked children, the compile notice;
* ``memory``: the pool of huge-page mappings for large outputs (:func:`release_memory`).
"""

from .backend import NumbaBackend
from .memory import release_memory

__all__ = ["NumbaBackend", "release_memory"]
