"""Shared fixtures: a fresh, reproducible seed per test."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """A different, reproducible seed for every test (derived from its id)."""
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)
