"""``SyncBatchNorm``: batch statistics over every rank of a ``torch.distributed``
process group, on any backend (gloo on CPU, NCCL on GPU, ...) and any compute
backend of this library. One collective per direction: an ``all_gather`` of the
packed per-rank ``[mean, var, count]`` in the forward, an ``all_reduce`` of the
packed ``[sum_dy, sum_dy_xmu]`` in the backward. Outside training, at world size
1 or without an initialized process group, it is the plain layer.

It is a variant of the plain layer, not a stack of its own: this rank's
statistics come from the backend's ``stats`` stage, the exchange and Chan's
merge give the global ones, and normalization and backward are the plain
layer's (``_ops.NormalizeWithStats``: ``apply``, ``backward_reduce``, the
all-reduce, ``backward_apply`` over the global count); the running update,
the residual add and the activation are the shared ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.autograd.function import once_differentiable

from . import _fx, _ghost, _ops, _route, _torch_ops, activations, kernels, modules
from ._checks import ShapeError, check_input, check_residual
from ._layout import as_ncl, output_memory_format, prepare
from ._swap import swap_layer
from .numerics import affine_from_stats, invstd_of, pooled, stats_dtype
from .running import recomputing, update_running_stats

Tensor = torch.Tensor

__all__ = ["SyncBatchNorm", "sync_batch_norm"]

# input rank -> the BatchNormXd a SyncBatchNorm reverts to
_DIM_OF_RANK = {2: 1, 3: 1, 4: 2, 5: 3}
_PLAIN_OURS = {1: modules.BatchNorm1d, 2: modules.BatchNorm2d, 3: modules.BatchNorm3d}
_PLAIN_TORCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# ---------------------------------------------------------------------------
# collectives and the merge


def _default_group(process_group):
    return process_group if process_group is not None else dist.group.WORLD


def sync_world_size(process_group=None) -> int:
    """Ranks that share statistics: 1 without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(_default_group(process_group))


def _pack_dtype(device: torch.device) -> torch.dtype:
    # the exchanged tensor is 2C+1 numbers: float64 costs nothing and keeps the
    # counts exact (to 2**53) and the merge stable; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def _all_gather(local: Tensor, group, world: int) -> Tensor:
    """``(world, *local.shape)``: every rank's ``local``, in group-rank order."""
    gather_single = getattr(dist, "all_gather_single", None)
    if gather_single is not None:
        out = local.new_empty(world * local.numel())
        gather_single(out, local.flatten(), group=group)
        return out.view(world, *local.shape)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts)


def agree_on_channels(channels: int, device: torch.device, process_group=None) -> None:
    """Raise the same ``ShapeError`` on every rank if the ranks' channel counts differ.

    A layer runs this once per process group before its first synchronized
    batch: the statistics exchange needs the same tensor size on every rank,
    and a collective with mismatched sizes fails unclearly or hangs.
    """
    group = _default_group(process_group)
    world = dist.get_world_size(group)
    seen = _all_gather(torch.tensor([channels], dtype=torch.int64, device=device), group, world).flatten().tolist()
    if any(c != channels for c in seen):
        listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(seen))
        raise ShapeError(
            f"SyncBatchNorm: the ranks of the process group disagree on the number of channels ({listing}); "
            "every rank must run the same model"
        )


def _merge(gathered: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global ``(mean, biased var, count per rank)`` from the gathered ``(W, 2C+1)`` rows, by
    ``numerics.pooled`` in the pack dtype. A rank with no samples sends zeros and weighs
    zero, so uneven and empty ranks need no special case."""
    means, vars_, counts = gathered[:, :channels], gathered[:, channels : 2 * channels], gathered[:, -1:]  # W,C W,C W,1
    mean, var, _ = pooled(means, vars_, counts)
    return mean, var, counts.flatten()


# ---------------------------------------------------------------------------
# functional form


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    process_group=None,
    *,
    num_batches_tracked: Tensor | None = None,
    skip_nonfinite: bool = True,
    nonfinite_count: Tensor | None = None,
    activation=None,
    residual: Tensor | None = None,
    virtual_batch_size: int | None = None,
) -> Tensor:
    """Training-mode batch norm with the statistics of the global batch (every rank's input).

    Each rank computes its per-channel mean and biased variance with the
    selected compute backend; one ``all_gather`` exchanges ``[mean, var, count]``
    (``2C + 1`` numbers per rank, float64) and each rank merges them
    identically (see ``_merge``). The per-rank counts are read to the host
    (``W`` numbers), so every rank takes the same decision for an empty global
    batch (empty output, ``num_batches_tracked`` still counted) or a single
    value per channel (``ValueError`` on every rank), and the running update
    gets the global count. The result equals :func:`batchnorm.functional.batch_norm`
    on the concatenation of the ranks' inputs.

    With ``virtual_batch_size=v`` (ghost batches, see :func:`_ghost_batch_norm`), ghost ``k``
    is every rank's ``k``-th run of ``v`` samples, normalized together.

    Every rank of ``process_group`` must call this with the same number of
    channels, and must run the backward if any rank does (it holds one
    ``all_reduce``). Double backward is not supported.
    """
    group = _default_group(process_group)
    world = dist.get_world_size(group)
    # every check of the functional form except "more than 1 value per channel",
    # which is about the global batch and is decided after the exchange
    check_input(input[:0], running_mean, running_var, weight, bias, True, eps)
    if recomputing():  # a checkpointed forward again: the statistics are counted already
        running_mean = running_var = num_batches_tracked = nonfinite_count = None
    act = activations.parse(activation)
    check_residual(input, residual)
    x = prepare(input)
    if virtual_batch_size is not None:
        y = _ghost_batch_norm(x, virtual_batch_size, group, world, running_mean, running_var, weight, bias, momentum,
                              eps, num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
        if y is not None:
            return _torch_ops.activate(y, residual, act.name, act.param, False)
    mean, var, total = _global_statistics(x, group, world)
    if total == 0:  # as batch_norm on an empty batch: nothing to learn, the batch still counts
        if num_batches_tracked is not None and running_mean is not None:
            num_batches_tracked.add_(1)
        y = input.clone(memory_format=output_memory_format(input))
        return _torch_ops.activate(y, residual, act.name, act.param, False)
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got 1 value per channel over the "
            f"{world} ranks of the process group (this rank's input size {input.size()})"
        )
    sdtype = stats_dtype(x.dtype)
    mean, var = mean.to(sdtype), var.to(sdtype)
    invstd = invstd_of(var, eps)  # (no grad: computed from the gathered statistics)
    y = _ops.NormalizeWithStats.apply(x, weight, bias, mean, invstd, total, _summing_over(group))
    if running_mean is not None or running_var is not None:
        update_running_stats(
            running_mean, running_var, mean, var, total, momentum, num_batches_tracked, skip_nonfinite, nonfinite_count
        )
    return _torch_ops.activate(y, residual, act.name, act.param, False)


def _global_statistics(x: Tensor, group, world: int) -> tuple[Tensor, Tensor, int]:
    """``(mean, biased var, count)`` of every rank's input: this rank's statistics, one
    ``all_gather``, the merge. The per-rank counts are read to the host (``W`` numbers), so
    every rank takes the same decision on an empty or single-value global batch."""
    x3 = as_ncl(x)
    channels, local = x3.shape[1], x3.shape[0] * x3.shape[2]
    pdtype = _pack_dtype(x.device)
    with torch.no_grad():  # the statistics' dependence on x is NormalizeWithStats' backward
        if local == 1:  # one value per channel (legal here, not in plain BN): no kernel needed
            mean, var = x3[0, :, 0], torch.zeros_like(x3[0, :, 0])  # C, C
        elif local > 1:
            mean, var = kernels.select(x3).stats(x3)  # C, C
        if local > 0:
            count = torch.full((1,), float(local), dtype=pdtype, device=x.device)
            packed = torch.cat([mean.to(pdtype), var.to(pdtype), count])  # 2C+1
        else:
            packed = torch.zeros(2 * channels + 1, dtype=pdtype, device=x.device)
        mean, var, counts = _merge(_all_gather(packed, group, world), channels)
    return mean, var, round(sum(counts.tolist()))  # the one host read: W numbers


def _ghost_batch_norm(x, size, group, world, running_mean, running_var, weight, bias, momentum, eps,
                      num_batches_tracked, skip_nonfinite, nonfinite_count) -> Tensor | None:  # fmt: skip
    """Ghost batches across ranks: ghost ``k`` is the ``k``-th run of ``size`` samples of every
    rank's input (a rank with fewer ghosts adds nothing to the last ones), normalized with the
    statistics of all of them; the running statistics move toward the ghosts' average, as the
    plain layer's do (``batchnorm._ghost``). One extra ``all_reduce`` agrees on the number of
    ghosts; the exchange is the plain path's, one row per ghost. ``None`` when every rank's
    input is empty (the caller takes the plain path)."""
    x3 = as_ncl(x)
    ghosts = torch.tensor([-(-x3.shape[0] // size)], device=x.device)
    dist.all_reduce(ghosts, op=dist.ReduceOp.MAX, group=group)
    count_ghosts = int(ghosts)
    if count_ghosts == 0:  # no rank has a sample: the plain path's empty global batch
        return None
    channels, pdtype = x3.shape[1], _pack_dtype(x.device)
    packed = torch.zeros(count_ghosts, 2 * channels + 1, dtype=pdtype, device=x.device)  # G,2C+1
    with torch.no_grad():
        for g, ghost in enumerate(x3.split(size)):
            count = ghost.shape[0] * ghost.shape[2]
            if count == 0:  # an empty rank: its row stays zeros and weighs zero
                continue
            if count == 1:  # one value per channel (legal on one rank): no kernel needed
                mean, var = ghost[0, :, 0], torch.zeros_like(ghost[0, :, 0])
            else:
                mean, var = kernels.select(ghost).stats(ghost)
            packed[g] = torch.cat([mean.to(pdtype), var.to(pdtype), packed.new_full((1,), count)])
        gathered = _all_gather(packed, group, world)  # W,G,2C+1
        means, vars_, counts = gathered[..., :channels], gathered[..., channels:-1], gathered[..., -1:]
        mean, var, totals = pooled(means, vars_, counts)  # G,C G,C G,1
    totals = [round(t) for t in totals.flatten().tolist()]  # the one host read: G numbers
    if min(totals) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel in every ghost batch when training, got {min(totals)} over the "
            f"{world} ranks of the process group (this rank's input size {tuple(x.shape)}, virtual_batch_size={size})"
        )
    sdtype = stats_dtype(x.dtype)
    mean, var = mean.to(sdtype), var.to(sdtype)
    invstd = invstd_of(var, eps)
    y = _NormalizeGhosts.apply(x, weight, bias, mean, invstd, size, totals, _summing_over(group))
    if running_mean is not None or running_var is not None:
        _ghost.update_running_from_ghosts(running_mean, running_var, mean, var, totals, momentum,
                                          num_batches_tracked, skip_nonfinite, nonfinite_count)  # fmt: skip
    return y


class _NormalizeGhosts(torch.autograd.Function):
    """:class:`_ops.NormalizeWithStats` per ghost: ``mean``/``invstd`` are ``[G, C]``, ghost ``g``
    of this rank's input (``size`` samples) is normalized with row ``g``, over ``totals[g]``
    values on every rank; the backward's sums are ``[G, C]``, combined in one collective."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, size, totals, combine):
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.size, ctx.totals, ctx.combine = size, totals, combine
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = torch.empty_like(x, memory_format=output_memory_format(x))
        for g, (ghost, out) in enumerate(zip(x.split(size), y.split(size), strict=True)):
            if ghost.numel():
                out.copy_(_ops._affine_impl(ghost, *affine_from_stats(mean[g], invstd[g], weight, bias)))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dy = dy.contiguous(memory_format=output_memory_format(x))
        dx = torch.empty_like(x, memory_format=output_memory_format(x))
        parts = [p for p in zip(*(as_ncl(t).split(ctx.size) for t in (x, dy, dx)), strict=True) if p[0].numel()]
        sum_dy, sum_dy_xmu = torch.zeros_like(mean), torch.zeros_like(mean)  # G,C: ghosts this rank lacks add 0
        for g, (x3, dy3, _) in enumerate(parts):
            sum_dy[g], sum_dy_xmu[g] = kernels.select(x3).backward_reduce(dy3, x3, mean[g])
        all_dy, all_dy_xmu = (t.view_as(mean) for t in ctx.combine(sum_dy.flatten(), sum_dy_xmu.flatten()))
        if ctx.needs_input_grad[0]:
            for g, (x3, dy3, out) in enumerate(parts):
                out.copy_(kernels.select(x3).backward_apply(dy3, x3, mean[g], invstd[g], weight, all_dy[g],
                                                            all_dy_xmu[g], ctx.totals[g]))  # fmt: skip
        dweight = None if weight is None else (sum_dy_xmu * invstd).sum(0).to(weight.dtype)
        dbias = None if ctx.bias_dtype is None else sum_dy.sum(0).to(ctx.bias_dtype)
        return (dx if ctx.needs_input_grad[0] else None), dweight, dbias, None, None, None, None, None


def _summing_over(group):
    """The backward's collective: both sums added over the group's ranks, packed in one all-reduce."""

    def combine(sum_dy: Tensor, sum_dy_xmu: Tensor) -> tuple[Tensor, Tensor]:
        packed = torch.cat([sum_dy, sum_dy_xmu])  # 2C
        dist.all_reduce(packed, group=group)
        return tuple(packed.chunk(2))

    return combine


# ---------------------------------------------------------------------------
# the module


class SyncBatchNorm(modules._BatchNorm, nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span every rank of a process group.

    Same constructor, buffers and ``state_dict`` keys as
    :class:`torch.nn.SyncBatchNorm` (checkpoints load both ways), plus
    ``skip_nonfinite`` (see :class:`batchnorm.BatchNorm2d`). Unlike torch's it
    runs on any ``torch.distributed`` backend and device (gloo on CPU included),
    with uneven and empty per-rank batches; see :func:`sync_batch_norm`.

    It subclasses torch's ``_BatchNorm`` (so ``isinstance`` checks for batch
    norm hold) but not ``torch.nn.SyncBatchNorm``: DistributedDataParallel
    refuses CPU modules that contain one of those.

    Synchronizes only in training mode when ``torch.distributed`` is
    initialized and the group has more than one rank; otherwise it is the plain
    layer (eval uses the running estimates, which are identical on every rank).
    Before its first synchronized batch in a group, the layer checks once that
    every rank has the same number of channels (one extra small collective).

    ``activation`` and ``forward(x, residual)`` compute
    ``activation(BN(x) + residual)``; in synchronized training the add and the
    activation run as torch ops after the normalization (not fused), and there
    is no ``memory_efficient`` mode.

    ``virtual_batch_size=v``: ghost batches across ranks, ghost ``k`` made of every rank's
    ``k``-th run of ``v`` samples (see :func:`sync_batch_norm`).

    Args:
        process_group: the ranks that share statistics (default: the whole world).
        others: as :class:`batchnorm.BatchNorm2d`.

    Shape:
        - Input: ``(N, C, *)``; ``N`` may differ between ranks and may be 0
        - Output: same shape (and memory format) as the input
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        skip_nonfinite: bool = True,
        activation=None,
        freeze_statistics: bool = False,
        freeze_affine: bool = False,
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, skip_nonfinite=skip_nonfinite, activation=activation,
            freeze_statistics=freeze_statistics, freeze_affine=freeze_affine, virtual_batch_size=virtual_batch_size,
        )  # fmt: skip
        self.process_group = process_group
        self.dim_hint: int | None = None  # 1, 2 or 3: the BatchNormXd this layer reverts to
        self._channels_agreed: tuple[int, int] | None = None  # (id of group, world) checked

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "SyncBatchNorm cannot be compiled by torch.jit.script (nor can torch.nn.SyncBatchNorm): "
            "TorchScript has no torch.distributed; for inference, swap it for a plain layer first with "
            "batchnorm.SyncBatchNorm.revert_sync_batchnorm(model) or batchnorm.convert(model, to='torch')"
        )

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if isinstance(input, fx.Proxy):  # symbolic tracing: one call of this layer
            return _fx.record_call(self, input, residual)
        self._check_input_dim(input)
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        self.dim_hint = _DIM_OF_RANK.get(input.dim(), self.dim_hint)
        world = sync_world_size(self.process_group) if self.training and not self.freeze_statistics else 1
        if world == 1:
            return super().forward(input, residual)
        if _route.tool_needs_torch_ops():
            raise RuntimeError(
                "SyncBatchNorm cannot synchronize its statistics under a tracer, torch.export, forward-mode AD "
                "or a torch.func transform; run those on the model in eval mode, or after "
                "batchnorm.SyncBatchNorm.revert_sync_batchnorm(model)"
            )
        if input.shape[1] != self.num_features:
            raise ShapeError(f"SyncBatchNorm({self.num_features}) got an input with {input.shape[1]} channels")
        group = _default_group(self.process_group)
        if self._channels_agreed != (id(group), world):
            agree_on_channels(self.num_features, input.device, group)
            self._channels_agreed = (id(group), world)
        update = self.track_running_stats
        return sync_batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            self.momentum,
            self.eps,
            group,
            num_batches_tracked=self.num_batches_tracked if update else None,
            skip_nonfinite=self.skip_nonfinite,
            nonfinite_count=self.num_nonfinite_batches if update else None,
            activation=self.activation,
            residual=residual,
            virtual_batch_size=self.virtual_batch_size,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every batch-norm layer of ``module`` with ``SyncBatchNorm``; return the model.

        Takes ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and
        this library's layers (subclasses other than these are left alone).
        The new layer keeps the very same parameter and buffer tensors, the
        train/eval mode, the hooks and a fused activation (``memory_efficient``
        is not carried over); if ``module`` is itself such a layer the
        replacement is returned. Convert before wrapping in DDP.
        """
        if type(module) in _CONVERTIBLE:
            new = swap_layer(module, cls)
            new.process_group = process_group
            new.skip_nonfinite = getattr(module, "skip_nonfinite", True)
            new.dim_hint = _dim_of(module)
            counter = getattr(module, "num_nonfinite_batches", None)
            if counter is not None and new.num_nonfinite_batches is not None:
                new.num_nonfinite_batches = counter
            if hasattr(module, "qconfig"):
                new.qconfig = module.qconfig
            return new
        for name, child in list(module.named_children()):
            setattr(module, name, cls.convert_sync_batchnorm(child, process_group))
        return module

    @classmethod
    def revert_sync_batchnorm(cls, module: nn.Module) -> nn.Module:
        """Replace every ``SyncBatchNorm`` (ours or torch's) with this library's plain
        ``BatchNorm1d/2d/3d``, same tensors; ``batchnorm.convert(model, to="torch")``
        gives torch's plain layers instead."""
        if type(module) in (cls, nn.SyncBatchNorm):
            new = swap_layer(module, plain_class(module, torch_layers=False))
            new.skip_nonfinite = getattr(module, "skip_nonfinite", True)
            return new
        for name, child in list(module.named_children()):
            setattr(module, name, cls.revert_sync_batchnorm(child))
        return module


_CONVERTIBLE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    modules.BatchNorm1d, modules.BatchNorm2d, modules.BatchNorm3d, SyncBatchNorm,
)  # fmt: skip


def _dim_of(layer: nn.Module) -> int | None:
    for dim, (ours, theirs) in enumerate(zip(_PLAIN_OURS.values(), _PLAIN_TORCH.values(), strict=True), start=1):
        if isinstance(layer, ours | theirs):
            return dim
    return getattr(layer, "dim_hint", None)


def plain_class(layer: nn.Module, torch_layers: bool) -> type[nn.Module]:
    """The ``BatchNormXd`` (torch's or ours) that a synchronized ``layer`` reverts to.

    The dimension is the one of the layer it was converted from, else of the
    last input it saw; a layer that has neither raises.
    """
    dim = _dim_of(layer)
    if dim is None:
        raise ValueError(
            f"cannot tell whether {type(layer).__name__}({layer.num_features}) should become BatchNorm1d, 2d or 3d: "
            "it was not converted from one and has seen no input; run one forward pass (any mode) first"
        )
    return (_PLAIN_TORCH if torch_layers else _PLAIN_OURS)[dim]
