"""Ghost batch norm (Hoffer et al. 2017, "Train longer, generalize better"): training
statistics per *ghost batch* of ``virtual_batch_size`` samples rather than per batch,
with ``weight`` and ``bias`` shared; Keras 2's ``virtual_batch_size``.

The batch's samples are cut in order into ghosts of ``v`` samples (the last one may be
smaller); each channel of each ghost is normalized with that ghost's mean and biased
variance. The running statistics move, once per batch, toward the average over the
ghosts of their means and of their unbiased variances (each ghost counts once, as Keras
did; with equal ghosts the mean is the batch mean). Eval is unaffected.

Each ghost runs torch's own batch-norm kernel (one call per ghost, then one copy to
join the outputs): a ghost is a contiguous slice of the batch in NCHW and channels-last
alike. Our kernels do not take ghosts yet (one pass over all ghosts).
"""

from __future__ import annotations

import torch

from . import activations
from .running import update_running_stats

Tensor = torch.Tensor


def check_size(virtual_batch_size: int | None) -> None:
    if virtual_batch_size is not None and (not isinstance(virtual_batch_size, int) or virtual_batch_size < 1):
        raise ValueError(f"virtual_batch_size must be a positive integer or None, got {virtual_batch_size!r}")


def batch_norm(
    x: Tensor,
    size: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
    skip_nonfinite: bool,
    nonfinite_count: Tensor | None,
    act: activations.Activation,
    residual: Tensor | None,
) -> Tensor:
    """Training: ``act(ghost_BN(x) + residual)`` (arguments as in ``functional.batch_norm``,
    already checked): each ghost, a contiguous slice of the batch in either memory format,
    through torch's batch-norm kernel and its autograd, the outputs joined in one copy."""
    ghosts = x.split(size)
    per_sample = x[0].numel() // x.shape[1]  # values per channel in one sample
    smallest = ghosts[-1].shape[0] * per_sample
    if smallest <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel in every ghost batch when training, got a ghost of "
            f"{smallest} (input size {tuple(x.shape)}, virtual_batch_size={size})"
        )
    outputs, means, invstds = [], [], []
    for ghost in ghosts:
        y, mean, invstd = torch.native_batch_norm(ghost, weight, bias, None, None, True, 0.0, eps)
        outputs.append(y)
        means.append(mean.detach())
        invstds.append(invstd.detach())
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            mean, invstd = torch.stack(means), torch.stack(invstds)  # (G, C)
            counts = torch.tensor([g.shape[0] * per_sample for g in ghosts], dtype=mean.dtype, device=mean.device)
            unbiased = ((invstd.pow(-2) - eps) * (counts / (counts - 1))[:, None]).mean(0)  # each ghost's, averaged
            total = int(counts.sum())  # given as the biased variance of `total` values that unbiases to it
            update_running_stats(running_mean, running_var, mean.mean(0), unbiased * ((total - 1) / total), total,
                                 momentum, num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    y = torch.cat(outputs)
    if residual is not None:
        y = y + residual
    return activations.forward(y, act)
