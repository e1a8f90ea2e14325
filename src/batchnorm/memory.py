"""What a computation costs in memory, counted from tensor storages.

Two measures, used by ``batchnorm bench`` for the fused layers and useful to
anyone checking what fusion or the memory-saving mode buys on their model:

* :func:`saved_bytes`: the bytes autograd keeps for the backward of ``fn()``
  (distinct storages packed by ``torch.autograd.graph.saved_tensors_hooks``);
* :func:`peak_bytes`: the most bytes of storages created inside ``fn()`` that
  are alive at the same time, seen at every torch operation (a
  ``TorchDispatchMode`` records each output's storage by weak reference). It
  counts tensors, not the allocator: memory an allocator keeps cached after a
  tensor dies (glibc's heap, our kernels' output pool) is not included, the
  same way for every implementation measured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["peak_bytes", "saved_bytes"]


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


class _LiveStorages(TorchDispatchMode):
    """Tracks the storages of every op output; ``peak`` is the most bytes alive at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}  # data_ptr -> (weak ref, bytes)
        self.current = 0
        self.peak = 0

    def _collect(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes of tensor storages created by ``fn()`` alive at the same time
    (forward, backward and optimizer steps inside ``fn`` included)."""
    tracker = _LiveStorages()
    with tracker:
        fn()
    return tracker.peak
