"""How a kernel of the ``numba`` backend is launched: on how many threads, which of its two
copies, and the one-line notice when Numba is about to compile.

Threads follow ``torch.get_num_threads()`` (capped by Numba's pool). The parallel copy of
a kernel runs under a lock, one launch at a time (Numba's workqueue threading layer needs
it), with static scheduling; a caller that finds the lock taken runs the serial copy
instead of waiting. Small tensors run the serial copies too (a thread launch costs more
than it saves), and so do forked child processes once the parent has started Numba's
thread pool (GNU OpenMP cannot survive that fork). Numba compiles each kernel on first
use and caches it on disk (next to the package, or in ``NUMBA_CACHE_DIR`` / the user
cache when that is not writable); the first compilation in a process logs one line on
the ``batchnorm`` logger.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numba
import torch

from ._helpers import Kernel

_log = logging.getLogger("batchnorm")

# Below this many elements (512 KiB of float32) a thread launch costs more than it
# saves, and on a busy machine waiting for a second thread to be scheduled costs more.
PARALLEL_MIN_NUMEL = 1 << 17

_launch = threading.Lock()  # one parallel launch at a time (the workqueue layer needs it)
_state = {"forked": False, "launched": False, "announced": False}
_seen: set = set()


def _after_fork_in_child() -> None:
    if _state["launched"]:
        _state["forked"] = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def count(numel: int) -> int:
    """Threads for a tensor of ``numel`` elements; 1 means run the serial copies."""
    if numel < PARALLEL_MIN_NUMEL or _state["forked"]:
        return 1
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _announce(dispatcher) -> None:
    """Log once per process when a kernel is about to be compiled (not found in the disk cache)."""
    if _state["announced"] or dispatcher in _seen:
        return
    _seen.add(dispatcher)
    if dispatcher.signatures:
        return
    cache_dir = dispatcher.stats.cache_path
    if glob.glob(os.path.join(cache_dir, f"*.{dispatcher.py_func.__qualname__}-*.nbi")):
        return  # will load from the disk cache
    _state["announced"] = True
    _log.warning("batchnorm: compiling the numba CPU kernels (once; about 10-60 s, then cached in %s)", cache_dir)


def launch(kernel: Kernel, numel: int, make_args: Callable[[int], tuple]) -> Any:
    """Run ``kernel`` on ``make_args(threads)``, with the thread count for ``numel`` elements."""
    threads = count(numel)
    if threads > 1 and _launch.acquire(blocking=False):
        try:
            _announce(kernel.parallel)
            # Set only what differs: each set costs the next parallel region 5-15 us.
            if numba.get_num_threads() != threads:
                numba.set_num_threads(threads)
            # Static scheduling (chunk size 0, Numba's default): chunked scheduling costs about 1 ms per chunk.
            chunksize = numba.get_parallel_chunksize()
            if chunksize:
                numba.set_parallel_chunksize(0)
            _state["launched"] = True
            try:
                return kernel.parallel(*make_args(threads))
            finally:
                if chunksize:
                    numba.set_parallel_chunksize(chunksize)
        finally:
            _launch.release()
    _announce(kernel.serial)
    return kernel.serial(*make_args(1))
