"""The error a ``batchnorm`` command raises for a mistake in what the user typed.

Its own module, so that the CLI catches the same class whether it runs as the
``batchnorm`` entry point or as ``python -m batchnorm.cli``.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """An option's value is wrong: one line naming the option, and exit status 2."""
