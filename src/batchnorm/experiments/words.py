"""How the report writes its numbers, for every page alike: a missing value is "-"."""

from __future__ import annotations

from typing import Any

__all__ = ["count_seeds", "num", "pct", "points"]


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal."""
    return "-" if v is None else f"{v:.1%}"


def num(v: Any) -> str:
    """Three significant digits."""
    return "-" if v is None else f"{v:.3g}"


def points(v: Any) -> str:
    """A difference of fractions in percentage points, signed."""
    return "-" if v is None else f"{100 * v:+.1f} points"


def count_seeds(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds"
