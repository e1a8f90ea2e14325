"""The memory measures: saved-for-backward bytes and the peak of live tensor storages."""

from __future__ import annotations

import torch

import batchnorm
from batchnorm.memory import peak_bytes, saved_bytes


def test_peak_counts_tensors_alive_together_not_one_after_another():
    n = 1 << 16

    def kept():
        a = torch.ones(n)
        b = torch.ones(n) * 2
        return a, b

    def freed():
        a = torch.ones(n)
        del a
        b = torch.ones(n)
        return b

    assert peak_bytes(kept) >= 3 * 4 * n  # a, ones, b = ones * 2
    assert 4 * n <= peak_bytes(freed) < 2 * 4 * n


def test_saved_bytes_of_relu_is_its_output():
    x = torch.randn(1000, requires_grad=True)
    assert saved_bytes(lambda: torch.relu(x * 2)) == 4 * 1000


def test_peak_of_a_training_step_sees_the_backward_and_our_kernels():
    x = torch.randn(8, 16, 64, 64, requires_grad=True)
    layer = batchnorm.BatchNorm2d(16, activation="relu")
    with batchnorm.backend("numba"):
        peak = peak_bytes(lambda: layer(x).sum().backward())
    assert peak >= 2 * x.numel() * 4  # y, then dx while y's gradient is alive
