"""Where the ``numba`` backend's large outputs live: mappings with transparent huge pages
requested, kept in a small pool once freed (as torch's CUDA caching allocator does).

glibc serves allocations of 32 MiB and more with a fresh mmap each time, and gives freed
memory at the top of its heap back to the system, so smaller large tensors (every
ResNet-50 layer at batch 32 is 12-100 MB) often fault in fresh pages too: ~25k page
faults plus zeroing for 100 MB, which on a small machine take longer than the kernel
itself (benchmarks/README.md, "Thresholds"). Outputs of ``HUGE_PAGE_MIN_BYTES`` and more get
their own mapping; at most ``POOL_MAX_BYTES`` are kept for reuse; :func:`release_memory`
empties the pool.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import torch

Tensor = torch.Tensor

HUGE_PAGE_MIN_BYTES = 1 << 23
POOL_MAX_BYTES = 1 << 30  # at most this much kept for reuse
_POOL_PER_SIZE = 4
_HUGE_PAGES = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")
NP_DTYPE = {torch.float32: np.float32, torch.float64: np.float64}
_pool: dict[int, list[mmap.mmap]] = {}
_pooled_bytes = [0]


class _Lease:
    """Owns a pooled mapping while a tensor uses it (NumPy's ``__array_interface__``
    makes it the array's base); gives the mapping back to the pool when collected."""

    def __init__(self, buffer: mmap.mmap, dtype: np.dtype, count: int):
        self.buffer = buffer
        self._anchor = ctypes.c_char.from_buffer(buffer)  # the address, valid while we hold it
        self.__array_interface__ = {
            "data": (ctypes.addressof(self._anchor), False),
            "shape": (count,),
            "typestr": np.dtype(dtype).str,
            "version": 3,
        }

    def __del__(self):
        try:
            del self._anchor
            size = len(self.buffer)
            kept = _pool.setdefault(size, [])
            if len(kept) < _POOL_PER_SIZE and _pooled_bytes[0] + size <= POOL_MAX_BYTES:
                kept.append(self.buffer)
                _pooled_bytes[0] += size
        except Exception:  # interpreter shutdown: let the mapping go
            pass


def release_memory() -> None:
    """Unmap the output buffers kept for reuse."""
    while _pool:
        _, kept = _pool.popitem()
        kept.clear()
    _pooled_bytes[0] = 0


def _mapping(nbytes: int) -> mmap.mmap:
    try:
        buffer = _pool[nbytes].pop()
        _pooled_bytes[0] -= nbytes
        return buffer
    except (KeyError, IndexError):
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buffer.madvise(mmap.MADV_HUGEPAGE)
        return buffer


def empty_like(x: Tensor) -> Tensor:
    """An uninitialized tensor with x's shape and strides (x is dense, float32 or float64)."""
    nbytes = x.numel() * x.element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES or not _HUGE_PAGES:
        return torch.empty_like(x)
    flat = torch.from_numpy(np.asarray(_Lease(_mapping(nbytes), NP_DTYPE[x.dtype], x.numel())))
    return torch.empty(0, dtype=x.dtype).set_(flat.untyped_storage(), 0, x.shape, x.stride())
