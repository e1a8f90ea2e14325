"""The sign mask's format: one bit per element, rows starting on bytes of their own, the same
for every backend (``kernels.sign_mask``)."""

from __future__ import annotations

import pytest
import torch

from batchnorm.kernels import sign_mask


def _layout(t, layout):
    return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "nlc" else t


@pytest.mark.parametrize("shape,layout", [((3, 5, 13), "ncl"), ((3, 13, 5), "nlc"), ((4, 9, 1), "ncl")], ids=str)
def test_sign_mask_round_trip_and_size(shape, layout):
    x = _layout(torch.randn(shape), layout)
    positive = torch.rand(shape) > 0.5
    mask = sign_mask.pack(positive, x)
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == sign_mask.shape(x)
    rows = mask.numel() // mask.shape[-1]
    assert mask.numel() <= x.numel() / 8 + rows  # one bit per element, plus padding to a byte per row
    assert torch.equal(sign_mask.unpack(mask, x), positive)


def test_layout_follows_the_memory_format():
    x = torch.randn(2, 3, 5)
    assert sign_mask.layout(x) == "ncl"
    assert sign_mask.layout(_layout(x, "nlc")) == "nlc"
    assert sign_mask.layout(torch.randn(4, 3, 1)) == "nlc"  # (B, N) input: rows of N
    assert sign_mask.layout(torch.randn(2, 3, 10)[:, :, ::2]) == "ncl"  # other strides: read as contiguous
    assert sign_mask.shape(x) == (2, 3, 1) and sign_mask.shape(_layout(x, "nlc")) == (10, 1)
    assert sign_mask.shape(torch.randn(2, 17, 4).transpose(1, 2).contiguous().transpose(1, 2)) == (8, 3)


def test_bit_order_is_little_endian_within_a_byte():
    x = torch.randn(1, 1, 10)
    positive = torch.zeros(1, 1, 10, dtype=torch.bool)
    positive[0, 0, 0] = positive[0, 0, 9] = True
    assert sign_mask.pack(positive, x).tolist() == [[[1, 2]]]
