"""The ``triton`` backend: Triton kernels for CUDA tensors (float32, float16, bfloat16).

Launchers only: shapes, strides, block sizes, grids and workspaces; the kernels
are in ``_triton_kernels``. Two paths per training direction:

* single pass, when a block of channels' whole ``N x L`` slice fits in one
  program's registers: ``x`` (and ``dy``) is read once, the output written once;
* split, otherwise: a 2-D grid (channel blocks x ranges of the ``N x L``
  extent) writes float32 partials (Welford summaries, or the two backward
  sums), a small kernel merges them per channel (Chan) and folds the result
  into per-channel coefficients, and an elementwise kernel writes
  ``y = x * scale + shift`` or ``dx = dy * k + x * a + b``.

Both layouts are read in place through strides: contiguous ``(N, C, L)`` tiles
along ``L`` (several channels per tile when ``L`` is short), channels-last
flattens the positions and tiles along ``C``. Importing this module needs
``triton`` (an ``ImportError`` otherwise, which the registry reports). Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (used by the tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton  # noqa: F401  (ImportError here means: backend unavailable)

from .. import activations
from ..activations import IDENTITY, Activation
from ..numerics import grad_input_coefficients
from . import _triton_kernels as K
from .base import Backend, count_of

Tensor = torch.Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class _Geometry:
    """How a kernel walks the ``(N, C, L)`` view: sizes, tile, grid, one stride triple per tensor."""

    n: int  # positions along the tile's first axis (N, or N*L for channels-last)
    c: int
    l: int  # positions along the tile's last axis (1 for channels-last)
    block_n: int
    block_c: int
    block_l: int
    strides: tuple[tuple[int, int, int], ...]  # per tensor, in the order given

    @property
    def tiles_l(self) -> int:
        return _cdiv(self.l, self.block_l)

    @property
    def tiles(self) -> int:
        return _cdiv(self.n, self.block_n) * self.tiles_l

    @property
    def channel_blocks(self) -> int:
        return _cdiv(self.c, self.block_c)

    @property
    def num_warps(self) -> int:
        return max(1, min(16, self.block_n * self.block_c * self.block_l // 512))

    def blocks(self) -> dict[str, int]:
        return {"BLOCK_N": self.block_n, "BLOCK_C": self.block_c, "BLOCK_L": self.block_l}


def _channels_last_strides(t: Tensor) -> tuple[int, int, int] | None:
    """``(position stride, channel stride, 1)`` if ``t``'s positions flatten to one
    stride and its channels are adjacent, else ``None``."""
    n, c, l = t.shape
    if c > 1 and t.stride(1) != 1:
        return None
    if l == 1:
        return (t.stride(0), t.stride(1), 1)
    if n == 1 or t.stride(0) == l * t.stride(2):
        return (t.stride(2), t.stride(1), 1)
    return None


def _best_block_l(length: int, tile: int) -> int:
    """The run along ``L`` per tile row: the longest power of two up to 1024 whose
    padding wastes at most 15% of the lanes, else the one that wastes least."""
    top = min(_pow2(length), tile, 1024)
    bottom = min(128, top)
    best, best_waste = top, None
    size = top
    while size >= bottom:
        waste = _cdiv(length, size) * size / length
        if waste <= 1.15:
            return size
        if best_waste is None or waste < best_waste:
            best, best_waste = size, waste
        size //= 2
    return best


class TritonBackend(Backend):
    """Triton kernels; the automatic choice for CUDA tensors of float32/16 and bfloat16.

    Args:
        tile: elements per tile of the split kernels (a power of two).
        single_pass_max: largest padded slice (elements) the single-pass kernels hold.
        waves: programs per multiprocessor the split grid aims for.
        min_tiles: fewest tiles a split program reduces (keeps the partials small).
        cpu_sm_count: multiprocessors assumed for CPU tensors (interpreter runs).
    """

    name = "triton"

    def __init__(
        self,
        tile: int = 4096,
        single_pass_max: int = 16384,
        waves: int = 4,
        min_tiles: int = 2,
        cpu_sm_count: int = 4,
    ) -> None:
        self.tile = tile
        self.single_pass_max = single_pass_max
        self.waves = waves
        self.min_tiles = min_tiles
        self.cpu_sm_count = cpu_sm_count
        self._plans: dict[tuple, _Geometry | None] = {}

    def supports(self, x: Tensor) -> bool:
        if not (x.is_cuda and x.dtype in _DTYPES and x.layout == torch.strided and x.dim() == 3):
            return False
        last = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride(), strict=True))
        return x.numel() <= _INT32_MAX and last <= _INT32_MAX  # 32-bit offsets in the kernels

    # -- planning ----------------------------------------------------------

    def _sm_count(self, x: Tensor) -> int:
        return _cuda_sm_count(x.device.index or 0) if x.is_cuda else self.cpu_sm_count

    def _geometry(self, tensors: tuple[Tensor, ...], single: bool) -> _Geometry | None:
        """Tile shape for ``tensors`` (all shaped like the first); ``None`` when
        ``single`` is asked for and the slice does not fit one program. Cached per
        shape and strides: a layer sees the same few every step."""
        sms = self._sm_count(tensors[0])
        key = (single, sms, tuple(tensors[0].shape), tuple(t.stride() for t in tensors))
        if key not in self._plans:
            if len(self._plans) >= 4096:
                self._plans.clear()
            self._plans[key] = self._plan(tensors, single, sms)
        return self._plans[key]

    def _plan(self, tensors: tuple[Tensor, ...], single: bool, sms: int) -> _Geometry | None:
        n, c, l = tensors[0].shape
        rows = [_channels_last_strides(t) for t in tensors]
        floor = 1  # narrowest channel block the single-pass kernels may use
        if c > 1 and all(r is not None for r in rows):  # channels adjacent: tile along C
            n, l = n * l, 1
            floor = min(_pow2(c), 16)  # 16 adjacent channels: whole 32-byte sectors
            strides = tuple(rows)
            block_l = 1
            block_n = _pow2(n) if single else None
            if single:
                if block_n * min(_pow2(c), 16) > self.single_pass_max:
                    return None
                block_c = min(_pow2(c), 64, self.single_pass_max // block_n)
            else:
                block_c = min(_pow2(c), 64)
                block_n = max(1, min(_pow2(n), self.tile // block_c))
        else:  # tile along L, several channels per tile when L is short
            strides = tuple((t.stride(0), t.stride(1), t.stride(2)) for t in tensors)
            if single:
                block_n, block_l = _pow2(n), _pow2(l)
                if block_n * block_l > self.single_pass_max:
                    return None
                block_c = min(_pow2(c), self.single_pass_max // (block_n * block_l))
            else:
                block_l = _best_block_l(l, self.tile)
                block_c = min(_pow2(c), max(1, 256 // block_l))
                block_n = max(1, min(_pow2(n), self.tile // (block_c * block_l)))
        if single:
            while block_c > floor and _cdiv(c, block_c) < sms:  # enough programs to fill the device
                block_c //= 2
        return _Geometry(n, c, l, block_n, block_c, block_l, strides)

    def _split(self, geo: _Geometry, x: Tensor, reduce: bool) -> tuple[int, int]:
        """``(S, tiles per program)`` for the second grid axis."""
        target = self._sm_count(x) * self.waves
        splits = max(1, min(geo.tiles, _cdiv(target, geo.channel_blocks)))
        if reduce:
            splits = min(splits, max(1, geo.tiles // self.min_tiles))
        per_prog = _cdiv(geo.tiles, splits)
        return _cdiv(geo.tiles, per_prog), per_prog

    # -- launches ------------------------------------------------------------

    def _partial_stats(self, x: Tensor, geo: _Geometry) -> tuple[Tensor, int]:
        splits, per_prog = self._split(geo, x, reduce=True)
        part = torch.empty((3, splits, geo.c), dtype=torch.float32, device=x.device)
        K.partial_stats[(geo.channel_blocks, splits)](
            x, part, geo.n, geo.c, geo.l, *geo.strides[0],
            geo.tiles_l, geo.tiles, per_prog, splits,
            **geo.blocks(), num_warps=geo.num_warps,
        )  # fmt: skip
        return part, splits

    def _partial_grad(self, dy: Tensor, x: Tensor, mean: Tensor, geo: _Geometry) -> tuple[Tensor, int]:
        splits, per_prog = self._split(geo, x, reduce=True)
        part = torch.empty((2, splits, geo.c), dtype=torch.float32, device=x.device)
        K.partial_grad[(geo.channel_blocks, splits)](
            dy, x, mean, part, geo.n, geo.c, geo.l, *geo.strides[0], *geo.strides[1],
            geo.tiles_l, geo.tiles, per_prog, splits,
            **geo.blocks(), num_warps=geo.num_warps,
        )  # fmt: skip
        return part, splits

    def _affine(self, x: Tensor, dy: Tensor | None, coef: Tensor) -> Tensor:
        out = torch.empty_like(x)
        tensors = (x, out) if dy is None else (x, out, dy)
        geo = self._geometry(tensors, single=False)
        splits, per_prog = self._split(geo, x, reduce=False)
        dy_strides = geo.strides[2] if dy is not None else geo.strides[0]
        K.affine[(geo.channel_blocks, splits)](
            x, x if dy is None else dy, out, coef,
            geo.n, geo.c, geo.l, *geo.strides[0], *dy_strides, *geo.strides[1],
            geo.tiles_l, geo.tiles, per_prog,
            HAS_DY=dy is not None, **geo.blocks(), num_warps=geo.num_warps,
        )  # fmt: skip
        return out

    @staticmethod
    def _finalize_blocks(c: int, splits: int) -> dict[str, int]:
        block_c = min(_pow2(c), 64)
        return {"BLOCK_C": block_c, "BLOCK_S": max(1, min(_pow2(splits), 4096 // block_c))}

    def _stats_and_coef(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, with_coef: bool
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(mean, var, invstd, y or None, coef or None)``; ``y`` only from the single-pass kernel,
        ``invstd`` (the one the scale was made of) only ``with_coef``."""
        c = x.shape[1]
        mean = torch.empty(c, dtype=torch.float32, device=x.device)
        var = torch.empty_like(mean)
        invstd = torch.empty_like(mean) if with_coef else mean
        w = _param(weight, mean)
        b = _param(bias, mean)
        single = self._geometry((x, x), single=True)
        if single is not None:
            y = torch.empty_like(x) if with_coef else x
            ygeo = self._geometry((x, y), single=True)
            K.forward_single[(ygeo.channel_blocks,)](
                x, y, mean, var, invstd, w, b, ygeo.n, ygeo.c, ygeo.l, *ygeo.strides[0], *ygeo.strides[1],
                float(x.shape[0] * x.shape[2]), eps,
                HAS_W=weight is not None, HAS_B=bias is not None, WRITE_Y=with_coef,
                **ygeo.blocks(), num_warps=ygeo.num_warps,
            )  # fmt: skip
            return mean, var, invstd, (y if with_coef else None), None
        geo = self._geometry((x,), single=False)
        part, splits = self._partial_stats(x, geo)
        coef = torch.empty((3, c), dtype=torch.float32, device=x.device) if with_coef else mean
        blocks = self._finalize_blocks(c, splits)
        K.finalize_stats[(_cdiv(c, blocks["BLOCK_C"]),)](
            part, x, mean, var, invstd, w, b, coef, splits, c, x.stride(1), eps,
            HAS_W=weight is not None, HAS_B=bias is not None, WRITE_COEF=with_coef, **blocks,
        )  # fmt: skip
        return mean, var, invstd, None, (coef if with_coef else None)

    def _grad_sums(
        self, dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor | None, weight: Tensor | None, with_dx: bool
    ) -> tuple[Tensor | None, Tensor, Tensor]:
        c = x.shape[1]
        mean = mean.to(torch.float32).contiguous()
        invstd = mean if invstd is None else invstd.to(torch.float32).contiguous()
        w = _param(weight, mean)
        sum_dy = torch.empty(c, dtype=torch.float32, device=x.device)
        sum_dy_xmu = torch.empty_like(sum_dy)
        count = float(x.shape[0] * x.shape[2])
        single = self._geometry((x, dy), single=True)
        if single is not None:
            dx = torch.empty_like(x) if with_dx else x
            geo = self._geometry((x, dy, dx), single=True)
            K.backward_single[(geo.channel_blocks,)](
                dy, x, dx, mean, invstd, w, sum_dy, sum_dy_xmu,
                geo.n, geo.c, geo.l, *geo.strides[0], *geo.strides[1], *geo.strides[2], count,
                HAS_W=weight is not None, WRITE_DX=with_dx, **geo.blocks(), num_warps=geo.num_warps,
            )  # fmt: skip
            return (dx if with_dx else None), sum_dy, sum_dy_xmu
        geo = self._geometry((x, dy), single=False)
        part, splits = self._partial_grad(dy, x, mean, geo)
        coef = torch.empty((3, c), dtype=torch.float32, device=x.device) if with_dx else mean
        blocks = self._finalize_blocks(c, splits)
        K.finalize_grad[(_cdiv(c, blocks["BLOCK_C"]),)](
            part, mean, invstd, w, sum_dy, sum_dy_xmu, coef, splits, c, count,
            HAS_W=weight is not None, WRITE_COEF=with_dx, **blocks,
        )  # fmt: skip
        dx = self._affine(x, dy, coef) if with_dx else None
        return dx, sum_dy, sum_dy_xmu

    # -- the backend interface -------------------------------------------------

    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.numel() == 0:
            return _torch().stats(x)
        mean, var, _, _, _ = self._stats_and_coef(x, None, None, 0.0, with_coef=False)
        return mean, var

    def apply(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        if x.numel() == 0:
            return _torch().apply(x, scale, shift)
        coef = torch.stack((scale.to(torch.float32), shift.to(torch.float32)))  # 2,C
        return self._affine(x, None, coef)

    def backward_reduce(self, dy: Tensor, x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        if x.numel() == 0:
            return _torch().backward_reduce(dy, x, mean)
        _, sum_dy, sum_dy_xmu = self._grad_sums(dy, x, mean, None, None, with_dx=False)
        return sum_dy, sum_dy_xmu

    def backward_apply(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        sum_dy: Tensor,
        sum_dy_xmu: Tensor,
        count: int | None = None,
    ) -> Tensor:
        if x.numel() == 0:
            return _torch().backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
        f32 = torch.float32
        k, a, b = grad_input_coefficients(mean.to(f32), invstd.to(f32), weight, sum_dy, sum_dy_xmu, count_of(x, count))
        return self._affine(x, dy, torch.stack((a, b, k)))

    def forward_train(
        self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: Activation = IDENTITY
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if x.numel() == 0:
            return _torch().forward_train(x, weight, bias, eps, act)
        mean, var, invstd, y, coef = self._stats_and_coef(x, weight, bias, eps, with_coef=True)
        if y is None:
            y = self._affine(x, None, coef)
        return activations.apply_(y, act), mean, var, invstd

    def backward_train(
        self,
        dy: Tensor,
        x: Tensor,
        mean: Tensor,
        invstd: Tensor,
        weight: Tensor | None,
        bias: Tensor | None = None,
        act: Activation = IDENTITY,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if x.numel() == 0:
            return _torch().backward_train(dy, x, mean, invstd, weight, bias, act)
        if act.kind.grad is not None:  # dz from the recomputed z, then the plain path below
            return super().backward_train(dy, x, mean, invstd, weight, bias, act)
        dx, sum_dy, sum_dy_xmu = self._grad_sums(dy, x, mean, invstd, weight, with_dx=True)
        return dx, sum_dy, sum_dy_xmu


def _param(p: Tensor | None, placeholder: Tensor) -> Tensor:
    """A per-channel parameter as the kernels read it (a placeholder pointer when absent)."""
    return placeholder if p is None else p.contiguous()


def _torch() -> Backend:
    from . import get

    return get("torch")
