"""The running-statistics update for CPU buffers as one compiled call.

At small sizes the update, not the normalization, dominated a training step on
the CPU: a dozen NumPy and torch calls of a few microseconds each. Here the
finiteness check and both buffers' update are one Numba function on NumPy
views of the buffers (``functional._update_on_cpu`` bumps their version counters).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def running_update(running_mean, running_var, mean, var, factor, var_factor, skip_nonfinite):
    """``running = (1 - factor) * running + scale * batch`` for both buffers (``scale`` is
    ``factor`` for the mean, ``var_factor`` for the variance), unless ``skip_nonfinite`` and a
    statistic is NaN/Inf; returns whether the buffers were updated. Either buffer may be empty."""
    if skip_nonfinite:
        for c in range(mean.shape[0]):
            if not (np.isfinite(mean[c]) and np.isfinite(var[c])):
                return False
    keep = 1.0 - factor
    for c in range(running_mean.shape[0]):
        running_mean[c] = keep * running_mean[c] + factor * mean[c]
    for c in range(running_var.shape[0]):
        running_var[c] = keep * running_var[c] + var_factor * var[c]
    return True
