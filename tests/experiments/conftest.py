"""Fixtures the demo's experiment tests share."""

from __future__ import annotations

import pytest
import torch

from batchnorm.experiments import datasets


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, as the demo uses on digits: tiny ops on two threads can be a hundred times slower
    on a busy machine (the threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    return datasets.load("digits")
