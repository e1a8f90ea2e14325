"""The bit mask ``act(BN(x) + residual)`` keeps for its backward: one bit per element,
set where ``BN(x) + residual > 0``.

With a residual added before ReLU/LeakyReLU, the activation's derivative cannot
be recomputed from ``x``; keeping the residual or the output would cost a full
tensor, this costs 1/32 of a float32 one. Every backend writes and reads the
same format, so a backward may run on another backend than its forward:

* ``"ncl"`` (a dense ``(N, C, L)`` tensor with ``L > 1``): ``uint8[N, C, ceil(L / 8)]``,
  bit ``l % 8`` of byte ``l // 8`` of row ``(n, c)``;
* ``"nlc"`` (channels-last, or ``L == 1``): ``uint8[N * L, ceil(C / 8)]``, bit
  ``c % 8`` of byte ``c // 8`` of row ``n * L + l``.

Each row starts on a byte of its own, so kernels that split the work by rows
(or by channel) never write the same byte from two threads.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def layout(x: Tensor) -> str:
    """``"nlc"`` for channels-last-dense or ``L == 1`` ``(N, C, L)`` tensors, else ``"ncl"``
    (other strided tensors are read as their contiguous copy)."""
    if x.shape[2] == 1:
        return "nlc"
    if not x.is_contiguous() and x.permute(0, 2, 1).is_contiguous():
        return "nlc"
    return "ncl"


def shape(x: Tensor) -> tuple[int, ...]:
    n, c, l = x.shape
    if layout(x) == "ncl":
        return (n, c, (l + 7) // 8)
    return (n * l, (c + 7) // 8)


def empty(x: Tensor) -> Tensor:
    """An uninitialized mask for ``x`` (N, C, L)."""
    return torch.empty(shape(x), dtype=torch.uint8, device=x.device)


def _rows(t: Tensor, kind: str) -> Tensor:
    """``t`` (N, C, L) as the rows the bits run along: (N, C, L) or (N * L, C)."""
    return t if kind == "ncl" else t.permute(0, 2, 1).reshape(-1, t.shape[1])


def pack(positive: Tensor, x: Tensor) -> Tensor:
    """The mask of a boolean ``(N, C, L)`` tensor, in the format for ``x``."""
    rows = _rows(positive, layout(x)).to(torch.uint8)
    width = rows.shape[-1]
    rows = torch.nn.functional.pad(rows, (0, -width % 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
    return (rows.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def unpack(mask: Tensor, x: Tensor) -> Tensor:
    """The boolean ``(N, C, L)`` tensor a mask for ``x`` holds."""
    n, c, l = x.shape
    kind = layout(x)
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = ((mask.unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()
    if kind == "ncl":
        return bits[..., :l]
    return bits[:, :c].reshape(n, l, c).permute(0, 2, 1)
