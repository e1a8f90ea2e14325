"""``SyncBatchNorm``: real gloo worlds on loopback (2 and 3 ranks) against one
process running our BatchNorm on the concatenated global batch, the faults
(mismatched channels, a rank that never arrives, skips the backward or dies),
and the conversions, which need no world.

Each world is started once per module (spawn costs seconds) and runs every
check of its scenario in order, recording each check's failure separately;
the tests then read the results, one test per check.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import socket
import time
import traceback
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import batchnorm
from batchnorm import SyncBatchNorm
from batchnorm._checks import ShapeError
from tests.helpers import assert_close

WORLD_TIMEOUT_S = 60  # the default group: orchestration only
FAULT_TIMEOUT_S = 2.0  # the short-timeout groups of the fault checks
DEADLINE_S = 150  # a whole world, spawn included; a hang fails instead of blocking CI
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}
_PLAIN = {1: batchnorm.BatchNorm1d, 2: batchnorm.BatchNorm2d, 3: batchnorm.BatchNorm3d}


# ---------------------------------------------------------------------------
# exactness of one layer


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    sizes: tuple[int, ...]  # batch size per rank; the global batch is their concatenation
    dim: int = 2  # BatchNorm{dim}d is the oracle
    spatial: tuple[int, ...] = (3, 4)
    channels: int = 5
    dtype: torch.dtype = torch.float64
    affine: bool = True
    bias: bool = True
    momentum: float | None = 0.1
    track: bool = True
    channels_last: bool = False
    backend: str | None = None  # None: automatic choice
    loc: float = 0.0  # mean of the data (1e4: the stability case)
    activation: str | None = None
    residual: bool = False
    param_dtype: torch.dtype | None = None  # parameters and buffers; None: the input's dtype


CASES_2 = [
    Case("bn2d_uneven", (3, 5)),
    Case("bn2d_relu_residual", (4, 2), activation="relu", residual=True),
    Case("bn2d_channels_last_f32_torch", (4, 4), dtype=torch.float32, channels_last=True, backend="torch"),
    Case("bn2d_channels_last_f32", (2, 3), dtype=torch.float32, channels_last=True, spatial=(5, 3)),
    Case("bn1d_2d_input_empty_rank_cumulative", (0, 6), dim=1, spatial=(), momentum=None),
    Case("bn1d_3d_input_no_affine", (1, 2), dim=1, spatial=(1,), affine=False),
    Case("bn3d_no_bias_torch", (2, 1), dim=3, spatial=(2, 3, 2), bias=False, backend="torch"),
    Case("no_running_stats_f32", (3, 3), dtype=torch.float32, track=False),
    Case("mean_1e4_f32", (7, 2), dtype=torch.float32, loc=1e4, spatial=(6, 5), momentum=1.0),
    Case("bf16_input_f32_params", (5, 3), dtype=torch.bfloat16, param_dtype=torch.float32),
]
CASES_3 = [
    Case("bn2d_uneven_with_empty_rank", (2, 0, 5)),
    Case("bn1d_one_row_per_rank", (1, 1, 1), dim=1, spatial=()),
    Case("bn2d_channels_last_empty_last_f32", (4, 3, 0), dtype=torch.float32, channels_last=True),
    Case("bn1d_3d_input_torch_cumulative", (3, 1, 2), dim=1, spatial=(7,), momentum=None, backend="torch"),
    Case("bn2d_silu_empty_rank", (0, 3, 4), activation="silu"),
]


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _twin_layers(case: Case, g: torch.Generator) -> tuple[nn.Module, nn.Module]:
    """Our SyncBatchNorm and the oracle BatchNormXd, with the same non-default state."""
    kwargs = dict(momentum=case.momentum, affine=case.affine, track_running_stats=case.track, bias=case.bias)
    kwargs["activation"] = case.activation
    dtype = case.param_dtype or case.dtype
    sync = SyncBatchNorm(case.channels, dtype=dtype, **kwargs)
    oracle = _PLAIN[case.dim](case.channels, dtype=dtype, **kwargs)
    with torch.no_grad():
        for name, tensor in oracle.named_parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=g, dtype=dtype))
            getattr(sync, name).copy_(tensor)
        if case.track:
            oracle.running_mean.copy_(torch.randn(case.channels, generator=g, dtype=dtype))
            oracle.running_var.copy_(torch.rand(case.channels, generator=g, dtype=dtype) + 0.5)
            oracle.num_batches_tracked.fill_(3)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(sync, name).copy_(getattr(oracle, name))
    return sync, oracle


def _local(x: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def _memory_format(case: Case) -> torch.memory_format:
    if not case.channels_last:
        return torch.contiguous_format
    return torch.channels_last if case.dim == 2 else torch.channels_last_3d


class Soft:
    """Collects failed comparisons and raises them together at the end of a check,
    so a rank whose comparison fails keeps running the collectives the others wait on."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def close(self, *args) -> None:
        try:
            assert_close(*args)
        except AssertionError as error:
            self.failures.append(str(error))

    def true(self, condition: bool, message: str) -> None:
        if not condition:
            self.failures.append(message)

    def raise_any(self) -> None:
        if self.failures:
            raise AssertionError("\n".join(self.failures))


def check_layer(case: Case, rank: int, world: int) -> None:
    """Two training steps and one eval step of the layer on this rank's share of
    the global batch equal the oracle on the whole batch: output (and memory
    format), input gradient, parameter gradients after DDP's all-reduce (DDP
    averages, so times the world size), running statistics."""
    soft = Soft()
    g = torch.Generator().manual_seed(_seed(case.name))
    sync, oracle = _twin_layers(case, g)
    model = DDP(sync) if case.affine else sync
    atol, rtol = TOL[case.dtype]
    p_atol, p_rtol = TOL[case.param_dtype or case.dtype]  # parameter gradients and buffers
    shape = (sum(case.sizes), case.channels, *case.spatial)
    fmt = _memory_format(case)
    with batchnorm.backend(case.backend):
        for step in range(2):
            x = torch.randn(shape, generator=g, dtype=case.dtype) * 2 + case.loc
            x = x + torch.randn(shape[1], generator=g, dtype=case.dtype).view(1, -1, *[1] * len(case.spatial))
            dy = torch.randn(shape, generator=g, dtype=case.dtype)
            x_full = x.clone().requires_grad_()
            x_mine = _local(x, case.sizes, rank).clone().contiguous(memory_format=fmt).requires_grad_()
            r_full = torch.randn(shape, generator=g, dtype=case.dtype).requires_grad_() if case.residual else None
            r_mine = _local(r_full, case.sizes, rank).detach().clone().requires_grad_() if case.residual else None
            sync.zero_grad(set_to_none=True), oracle.zero_grad(set_to_none=True)
            y_full, y_mine = oracle(x_full, r_full), model(x_mine, r_mine)
            (y_full * dy).sum().backward()
            (y_mine * _local(dy, case.sizes, rank)).sum().backward()
            what = f"{case.name} rank {rank} step {step}"
            if case.loc == 0:
                soft.close(y_mine, _local(y_full, case.sizes, rank), atol, rtol, f"{what}: output")
            else:  # float32 data near 1e4: one ulp of x is 1e-3; the statistics are checked below
                soft.close(y_mine, _local(y_full, case.sizes, rank), 2e-3, 0, f"{what}: output")
            if y_mine.numel():  # (an empty tensor has no memory format to keep)
                soft.true(y_mine.is_contiguous(memory_format=fmt), f"{what}: output memory format")
            if case.loc:  # gradients there differ by the float32 rounding of x itself; covered by the other cases
                continue
            soft.close(x_mine.grad, _local(x_full.grad, case.sizes, rank), atol, rtol, f"{what}: input grad")
            if case.residual:
                soft.close(r_mine.grad, _local(r_full.grad, case.sizes, rank), atol, rtol, f"{what}: residual grad")
            for name, p in oracle.named_parameters():
                mine = getattr(sync, name).grad * world
                soft.close(mine, p.grad, p_atol, p_rtol, f"{what}: {name} grad (after DDP)")
            for name, buf in oracle.named_buffers():
                soft.close(getattr(sync, name), buf, p_atol, p_rtol, f"{what}: {name}")
        if case.loc:  # momentum 1: the running estimates are the last batch's, against float64
            xd = x.double()
            dims = [0, *range(2, xd.dim())]
            soft.close(sync.running_mean, xd.mean(dims), 0, 1e-6, f"{case.name} rank {rank}: global mean")
            soft.close(sync.running_var, xd.var(dims), 0, 1e-4, f"{case.name} rank {rank}: global variance")
        sync.eval(), oracle.eval()
        x = torch.randn(shape, generator=g, dtype=case.dtype) + case.loc
        x_mine = _local(x, case.sizes, rank).contiguous(memory_format=fmt)
        with torch.no_grad():
            y_mine = model(x_mine)
            # without running estimates eval uses the batch's statistics, and (as torch's) does not synchronize
            y_full = oracle(x) if case.track else torch.cat([oracle(part) for part in x.split(case.sizes)])
        soft.close(y_mine, _local(y_full, case.sizes, rank), *((atol, rtol) if not case.loc else (2e-3, 0)), "eval")
    soft.raise_any()


# ---------------------------------------------------------------------------
# a few DDP training steps of a small CNN


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), batchnorm.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), batchnorm.BatchNorm2d(6, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3), batchnorm.BatchNorm1d(3),
    ).double()  # fmt: skip


def check_ddp_cnn(sizes: tuple[int, ...], rank: int, world: int, steps: int = 3) -> None:
    """SGD with momentum, ``steps`` steps: the DDP model with SyncBatchNorm on this
    rank's share equals the single-process model on the global batch (outputs,
    then every parameter and buffer). Loss: the mean over the global batch, so
    rank r contributes ``world / B * sum(its losses)`` (DDP averages)."""
    soft = Soft()
    seed = _seed(f"cnn{sizes}")
    single = _cnn(seed)
    synced = SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(single))
    soft.true(sum(isinstance(m, SyncBatchNorm) for m in synced.modules()) == 3, "convert_sync_batchnorm")
    ddp = DDP(synced)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.2, momentum=0.9)
    opt_synced = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    for step in range(steps):
        images = torch.randn(total, 2, 6, 5, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (total,), generator=g)
        out_single = single(images)
        nn.functional.cross_entropy(out_single, labels).backward()
        out_synced = ddp(_local(images, sizes, rank))
        loss = nn.functional.cross_entropy(out_synced, _local(labels, sizes, rank), reduction="sum") * world / total
        loss.backward()
        soft.close(out_synced, _local(out_single, sizes, rank), 1e-10, 1e-10, f"rank {rank} step {step}: logits")
        opt_single.step(), opt_synced.step()
        opt_single.zero_grad(), opt_synced.zero_grad()
    mine = dict(synced.named_parameters()) | dict(synced.named_buffers())
    for name, expected in [*single.named_parameters(), *single.named_buffers()]:
        soft.close(mine[name], expected, 1e-10, 1e-10, f"rank {rank}: {name} after {steps} steps")
    soft.raise_any()


def check_checkpointed(rank: int, world: int) -> None:
    """Under ``torch.utils.checkpoint`` (non-reentrant) the recomputation in the backward
    gathers the statistics again but updates the running ones once: as the plain layer
    on the global batch without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    sizes = (3, 5, 4)[:world]
    sync = SyncBatchNorm(4, dtype=torch.float64)
    plain = batchnorm.BatchNorm2d(4, dtype=torch.float64)
    g = torch.Generator().manual_seed(_seed("checkpointed"))
    for _ in range(2):
        x = torch.randn(sum(sizes), 4, 3, 2, dtype=torch.float64, generator=g)
        plain(x).sum().backward()
        checkpoint(sync, _local(x, sizes, rank).requires_grad_(), use_reentrant=False).square().sum().backward()
    assert int(sync.num_batches_tracked) == 2
    assert_close(sync.running_mean, plain.running_mean, 1e-12, 1e-12, "running_mean")
    assert_close(sync.running_var, plain.running_var, 1e-12, 1e-12, "running_var")


def check_population(rank: int, world: int) -> None:
    """``precise_statistics`` and ``accumulate`` pool SyncBatchNorm's statistics across the
    ranks: every rank ends with the statistics of all ranks' data (uneven shares)."""
    sizes = (3, 6, 4)[:world]
    g = torch.Generator().manual_seed(_seed("population"))
    data = [torch.randn(sum(sizes), 4, 3, 2, dtype=torch.float64, generator=g) for _ in range(3)]
    precise = SyncBatchNorm(4, dtype=torch.float64)
    batchnorm.precise_statistics(precise, [_local(x, sizes, rank) for x in data])
    everything = torch.cat(data).transpose(0, 1).reshape(4, -1)
    assert_close(precise.running_mean, everything.mean(1), 1e-12, 1e-12, "precise: running_mean")
    assert_close(precise.running_var, everything.var(1), 1e-12, 1e-12, "precise: running_var")
    accumulated, big = SyncBatchNorm(4, dtype=torch.float64), nn.BatchNorm2d(4, dtype=torch.float64)
    with batchnorm.accumulate(accumulated, steps=3):
        for x in data:
            accumulated(_local(x, sizes, rank)).sum().backward()
    big(torch.cat(data))
    assert_close(accumulated.running_mean, big.running_mean, 1e-12, 1e-12, "accumulate: running_mean")
    assert_close(accumulated.running_var, big.running_var, 1e-12, 1e-12, "accumulate: running_var")
    assert int(accumulated.num_batches_tracked) == 1


def check_ghosts(rank: int, world: int, sizes: tuple[int, ...], backend: str | None = None) -> None:
    """``virtual_batch_size`` across ranks: ghost k, every rank's k-th run of samples together,
    as torch's batch norm on those samples alone (outputs, input and parameter gradients); the
    running statistics move toward the ghosts' average of means and unbiased variances."""
    size = 3
    g = torch.Generator().manual_seed(_seed(f"ghosts{sizes}"))
    sync = SyncBatchNorm(4, virtual_batch_size=size, momentum=0.5, dtype=torch.float64)
    with torch.no_grad():
        sync.weight.uniform_(0.5, 1.5, generator=g)
        sync.bias.uniform_(-1, 1, generator=g)
    x = torch.randn(sum(sizes), 4, 5, dtype=torch.float64, generator=g) * 2 + 1
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    x_full, weight, bias = (t.detach().clone().requires_grad_() for t in (x, sync.weight, sync.bias))
    parts = x_full.split(sizes)  # rank r's input, then its ghosts
    ghosts = [[p[k * size : (k + 1) * size] for p in parts] for k in range(-(-max(sizes) // size))]
    outputs = [nn.functional.batch_norm(torch.cat(gk), None, None, weight, bias, True).split([len(t) for t in gk])
               for gk in ghosts]  # fmt: skip
    y_full = torch.cat([torch.cat([outputs[k][r] for k in range(len(ghosts))]) for r in range(world)])
    (y_full * dy).sum().backward()
    x_mine = _local(x, sizes, rank).clone().requires_grad_()
    with batchnorm.backend(backend):
        y_mine = sync(x_mine)
        (y_mine * _local(dy, sizes, rank)).sum().backward()
    assert_close(y_mine, _local(y_full, sizes, rank), 1e-12, 1e-12, "output")
    assert_close(x_mine.grad, _local(x_full.grad, sizes, rank), 1e-11, 1e-11, "input grad")
    for name, want in (("weight", weight.grad), ("bias", bias.grad)):
        got = getattr(sync, name).grad.clone()
        dist.all_reduce(got)  # this rank's share, as for any parameter (DDP adds them up)
        assert_close(got, want, 1e-11, 1e-11, f"{name} grad")
    joined = [torch.cat(gk).detach().transpose(0, 1).reshape(4, -1) for gk in ghosts]
    mean = torch.stack([v.mean(1) for v in joined]).mean(0)
    var = torch.stack([v.var(1) for v in joined]).mean(0)
    assert_close(sync.running_mean, 0.5 * mean, 1e-12, 1e-12, "running_mean")
    assert_close(sync.running_var, 0.5 + 0.5 * var, 1e-12, 1e-12, "running_var")


def check_group_of_one(rank: int, world: int) -> None:
    """A group holding only this rank: the plain layer (no collective), as BatchNorm2d."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    sync = SyncBatchNorm(4, process_group=groups[rank], dtype=torch.float64)
    plain = batchnorm.BatchNorm2d(4, dtype=torch.float64)
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    assert_close(sync(x), plain(x), 0, 0, "output")
    assert_close(sync.running_var, plain.running_var, 0, 0, "running_var")


# ---------------------------------------------------------------------------
# faults: every check runs in a fresh group with a short timeout


def _fault_group(world: int):
    dist.barrier()  # (default group) creating a group waits for every rank only as long as its timeout
    return dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=FAULT_TIMEOUT_S), backend="gloo")


def _expect_timeout(action: Callable[[], object], what: str) -> None:
    """``action`` must fail with the group's timeout error, after about the group's timeout."""
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?i)timed out|timeout") as caught:
        action()
    elapsed = time.monotonic() - start
    in_time = FAULT_TIMEOUT_S * 0.5 <= elapsed <= FAULT_TIMEOUT_S * 5
    assert in_time, f"{what}: raised after {elapsed:.1f} s: {caught.value}"


def check_channel_mismatch(rank: int, world: int) -> None:
    """Rank r has 3 + r channels (r > 0 differs from rank 0): every rank raises
    the same clear error, and the layer works again once the ranks agree."""
    group = _fault_group(world)
    channels = 3 + (rank % 2)
    layer = SyncBatchNorm(channels, process_group=group)
    listing = ", ".join(f"rank {r}: {3 + r % 2}" for r in range(world))
    with pytest.raises(ShapeError, match=f"disagree on the number of channels \\({listing}\\)"):
        layer(torch.randn(4, channels, 3))
    agreeing = SyncBatchNorm(3, process_group=group)
    assert agreeing(torch.randn(4, 3, 2)).shape == (4, 3, 2)  # the group is still usable


def check_single_value(rank: int, world: int) -> None:
    """One value per channel over the whole group (rank 0 has one row, the others
    none): the error torch gives for one value, on every rank."""
    layer = SyncBatchNorm(3, process_group=_fault_group(world))
    rows = 1 if rank == 0 else 0
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got 1 value"):
        layer(torch.randn(rows, 3))
    assert int(layer.num_batches_tracked) == 0


def check_empty_global_batch(rank: int, world: int) -> None:
    """No rank has a sample: an empty output, running estimates unchanged, the batch counted (as BatchNorm)."""
    layer = SyncBatchNorm(3, process_group=_fault_group(world))
    x = torch.randn(0, 3, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 3, 4) and x.grad.shape == (0, 3, 4)
    assert int(layer.num_batches_tracked) == 1 and torch.equal(layer.running_mean, torch.zeros(3))


def check_rank_never_arrives(rank: int, world: int) -> None:
    """The last rank does not call the layer: the others fail with the timeout
    error, both in the statistics exchange (after a good step) and in the
    channel check of a layer's first synchronized batch."""
    group = _fault_group(world)
    layer = SyncBatchNorm(3, process_group=group)
    layer(torch.randn(4, 3))  # every rank: channel check and one good exchange
    if rank != world - 1:
        _expect_timeout(lambda: layer(torch.randn(4, 3)), "statistics exchange")
    group = _fault_group(world)  # a timed-out gloo group is closed for good
    if rank != world - 1:
        _expect_timeout(lambda: SyncBatchNorm(3, process_group=group)(torch.randn(4, 3)), "channel check")


def check_rank_skips_backward(rank: int, world: int) -> None:
    """Every rank runs the forward; the last one drops its output: the others' backward times out."""
    layer = SyncBatchNorm(3, process_group=_fault_group(world))
    x = torch.randn(4, 3, requires_grad=True)
    y = layer(x)
    if rank != world - 1:
        _expect_timeout(lambda: y.square().sum().backward(), "backward")


def check_rank_dies(rank: int, world: int) -> None:
    """The last rank exits before the layer: the others fail (connection lost or timeout), not hang."""
    group = _fault_group(world)
    layer = SyncBatchNorm(3, process_group=group)
    layer(torch.randn(4, 3))  # channel check and one good exchange
    if rank == world - 1:
        _STATE["results"]["rank_dies"] = None
        _report_and_exit()  # this rank's results are sent; the process dies here
    start = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        layer(torch.randn(4, 3))
    elapsed = time.monotonic() - start
    assert elapsed <= FAULT_TIMEOUT_S * 5, f"failed only after {elapsed:.1f} s: {caught.value}"


# ---------------------------------------------------------------------------
# one process: no process group, conversions, state_dict


@pytest.mark.parametrize("backend", [None, "torch"])
def test_without_process_group_it_is_batchnorm(backend):
    sync, plain = SyncBatchNorm(4, momentum=None), batchnorm.BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        sync.weight.normal_(), sync.bias.normal_()
        plain.weight.copy_(sync.weight), plain.bias.copy_(sync.bias)
    x = torch.randn(5, 4, 3, 2)
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn_like(x)
    with batchnorm.backend(backend):
        (sync(xs) * dy).sum().backward()
        (plain(xp) * dy).sum().backward()
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert_close(getattr(sync, name), getattr(plain, name), 0, 0, name)
        assert_close(xs.grad, xp.grad, 0, 0, "input grad")
        assert_close(sync.weight.grad, plain.weight.grad, 0, 0, "weight grad")
        sync.eval(), plain.eval()
        assert_close(sync(x), plain(x), 0, 0, "eval output")


def test_state_dict_and_type_are_torch_syncbatchnorms():
    ours, theirs = SyncBatchNorm(3, momentum=None), nn.SyncBatchNorm(3, momentum=None)
    with torch.no_grad():
        theirs.running_mean.normal_(), theirs.weight.normal_()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.running_mean, theirs.running_mean) and torch.equal(ours.weight, theirs.weight)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert not isinstance(ours, nn.SyncBatchNorm)  # DDP refuses CPU modules holding torch's
    assert repr(ours) == repr(theirs)


def test_input_checks():
    layer = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected at least 2D input \\(got 1D input\\)"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        SyncBatchNorm(0)(torch.randn(2, 0))


def _mixed_model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), batchnorm.BatchNorm2d(4, skip_nonfinite=False),
        nn.Sequential(nn.Conv3d(4, 2, 1), nn.BatchNorm3d(2, affine=False)), nn.Flatten(2),
        nn.BatchNorm1d(2, track_running_stats=False), nn.SyncBatchNorm(2), nn.InstanceNorm1d(2),
    )  # fmt: skip


def test_convert_sync_batchnorm_takes_torch_and_ours_keeping_tensors_mode_and_hooks():
    model = _mixed_model()
    model[3].eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    group = object()  # stands for a process group: only carried here
    SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    layers = [model[1], model[2], model[3][1], model[5], model[6]]
    assert all(type(m) is SyncBatchNorm and m.process_group is group for m in layers)
    assert type(model[7]) is nn.InstanceNorm1d
    assert [m.dim_hint for m in layers] == [2, 2, 3, 1, None]
    assert model[2].skip_nonfinite is False and model[1].skip_nonfinite is True
    assert not model[3][1].training and model[1].training and model[3][1].weight is None
    assert model[5].running_mean is None
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in tensors:
            assert t is tensors[name], f"{name} was copied, not kept"
    model[1](torch.randn(2, 4, 3, 3))
    assert seen == [SyncBatchNorm]
    bare = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3))
    assert type(bare) is SyncBatchNorm and bare.process_group is None


def test_revert_to_torch_and_to_ours_picks_the_dimension():
    model = SyncBatchNorm.convert_sync_batchnorm(_mixed_model())
    fresh = SyncBatchNorm(4)
    fresh(torch.randn(2, 4, 3, 3, 3))  # a 5D input: BatchNorm3d
    model.append(fresh)
    model[6].dim_hint = 1  # (the former torch SyncBatchNorm, as after a forward on 3D input)
    weight = model[1].weight
    batchnorm.convert(model, to="torch")
    types = [type(model[i]) for i in (1, 2, 5, 6, 8)] + [type(model[3][1])]
    assert types == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm3d, nn.BatchNorm3d]
    assert model[1].weight is weight and model[3][1].running_mean is not None
    ours = SyncBatchNorm.revert_sync_batchnorm(SyncBatchNorm.convert_sync_batchnorm(model))
    assert type(ours[1]) is batchnorm.BatchNorm2d and type(ours[8]) is batchnorm.BatchNorm3d
    with pytest.raises(ValueError, match="should become BatchNorm1d, 2d or 3d"):
        batchnorm.convert(SyncBatchNorm(3), to="torch")


def test_the_fused_activation_travels_between_our_layers_and_not_to_torch():
    layer = batchnorm.BatchNorm2d(3, activation=("leaky_relu", 0.2))
    synced = SyncBatchNorm.convert_sync_batchnorm(layer)
    assert synced.activation == layer.activation
    x, r = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert_close(synced(x, r), nn.functional.leaky_relu(batchnorm.BatchNorm2d(3)(x) + r, 0.2), 1e-6, 1e-6, "world 1")
    assert SyncBatchNorm.revert_sync_batchnorm(synced).activation == layer.activation
    with pytest.raises(ValueError, match=r"fused activation leaky_relu\(0.2\) has no torch.nn equivalent"):
        batchnorm.convert(synced, to="torch")


def test_convert_maps_torch_syncbatchnorm_to_ours_with_its_group():
    group = object()
    layer = batchnorm.convert(nn.SyncBatchNorm(3, process_group=group, bias=False))
    assert type(layer) is SyncBatchNorm and layer.process_group is group and layer.bias is None


# ---------------------------------------------------------------------------
# worlds: scenarios, the worker and the launcher

SCENARIOS: dict[str, list[tuple[str, Callable[[int, int], None]]]] = {
    "two": [
        *[(f"layer_{c.name}", lambda r, w, c=c: check_layer(c, r, w)) for c in CASES_2],
        ("ddp_cnn_even", lambda r, w: check_ddp_cnn((6, 6), r, w)),
        ("ddp_cnn_uneven", lambda r, w: check_ddp_cnn((3, 7), r, w)),
        ("group_of_one", check_group_of_one),
        ("checkpointed", check_checkpointed),
        ("population", check_population),
        ("ghosts_uneven", lambda r, w: check_ghosts(r, w, (7, 4))),
        ("ghosts_even_numba", lambda r, w: check_ghosts(r, w, (6, 6), "numba")),
        ("channel_mismatch", check_channel_mismatch),
        ("single_value", check_single_value),
        ("empty_global_batch", check_empty_global_batch),
        ("rank_never_arrives", check_rank_never_arrives),
        ("rank_skips_backward", check_rank_skips_backward),
    ],
    "three": [
        *[(f"layer_{c.name}", lambda r, w, c=c: check_layer(c, r, w)) for c in CASES_3],
        ("ddp_cnn_uneven_empty_rank", lambda r, w: check_ddp_cnn((5, 0, 4), r, w)),
        ("ghosts_empty_rank", lambda r, w: check_ghosts(r, w, (5, 0, 8))),
        ("channel_mismatch", check_channel_mismatch),
        ("rank_dies", check_rank_dies),
    ],
}
_STATE: dict = {}


def _report_and_exit() -> None:
    _STATE["queue"].put((_STATE["rank"], _STATE["results"]))
    os._exit(0)  # skip the teardown of groups that hold failed collectives


def _worker(rank: int, world: int, port: int, scenario: str, queue) -> None:
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results: dict[str, str | None] = {}
    _STATE.update(queue=queue, rank=rank, results=results)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S),
        )  # fmt: skip
        for name, check in SCENARIOS[scenario]:
            torch.manual_seed(_seed(name) + rank)
            try:
                check(rank, world)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
            if name != "rank_dies":  # (that one leaves a rank dead; it comes last)
                dist.barrier()  # (default group) the ranks start every check together
    except Exception:
        results["<world>"] = traceback.format_exc()
    _report_and_exit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, scenario: str) -> dict[str, dict[int, str | None]]:
    """Start ``world`` gloo ranks on loopback, run the scenario; {check: {rank: failure or None}}."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, queue), daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    reports: dict[int, dict[str, str | None]] = {}
    deadline = time.monotonic() + DEADLINE_S
    try:
        while len(reports) < world:
            if not queue.empty():
                rank, results = queue.get()
                reports[rank] = results
            elif time.monotonic() > deadline:
                raise AssertionError(f"{world} ranks did not finish in {DEADLINE_S} s; reports from {sorted(reports)}")
            elif any(p.exitcode not in (None, 0) for p in procs):
                codes = [p.exitcode for p in procs]
                raise AssertionError(f"a rank crashed (exit codes {codes}); reports from {sorted(reports)}")
            else:
                time.sleep(0.05)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    for rank, results in reports.items():
        if "<world>" in results:
            raise AssertionError(f"rank {rank} failed outside the checks:\n{results['<world>']}")
    return {name: {r: reports[r].get(name, "did not run") for r in range(world)} for name, _ in SCENARIOS[scenario]}


@pytest.fixture(scope="module")
def world_two():
    return run_world(2, "two")


@pytest.fixture(scope="module")
def world_three():
    return run_world(3, "three")


def _assert_passed(results: dict[int, str | None]) -> None:
    failures = {rank: text for rank, text in results.items() if text is not None}
    assert not failures, "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in failures.items())


@pytest.mark.distributed
@pytest.mark.parametrize("check", [name for name, _ in SCENARIOS["two"]])
def test_two_ranks(world_two, check):
    _assert_passed(world_two[check])


@pytest.mark.distributed
@pytest.mark.parametrize("check", [name for name, _ in SCENARIOS["three"]])
def test_three_ranks(world_three, check):
    _assert_passed(world_three[check])
