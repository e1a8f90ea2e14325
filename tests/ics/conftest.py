"""Fixtures the ics tests share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
