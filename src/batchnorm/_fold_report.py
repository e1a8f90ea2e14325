"""What ``batchnorm.fold(model, report=True)`` says it did: one entry per batch-norm call.

Each batch norm the traced model calls is either folded into a layer (it costs nothing
at inference), frozen (one multiply-add remains, and the entry says why it could not be
folded), or left as it was (a layer whose computation fold cannot keep, and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FOLDED", "FROZEN", "LEFT", "FoldEntry", "FoldReport"]

FOLDED, FROZEN, LEFT = "folded into", "frozen", "left"


@dataclass(frozen=True)
class FoldEntry:
    """One batch-norm call: ``batch_norm`` (its module path, with the call site where the
    module is called more than once), ``action`` (:data:`FOLDED`, :data:`FROZEN` or
    :data:`LEFT`), ``target`` (the layer it was folded into, as named in the new model;
    empty otherwise) and ``reason`` (why it was not folded, or a note on how it was)."""

    batch_norm: str
    action: str
    target: str = ""
    reason: str = ""


@dataclass
class FoldReport:
    """What :func:`batchnorm.fold` did, one :class:`FoldEntry` per batch-norm call;
    ``str()`` gives a readable table."""

    entries: list[FoldEntry] = field(default_factory=list)

    @property
    def folded(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.action == FOLDED]

    @property
    def frozen(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.action == FROZEN]

    @property
    def left(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.action == LEFT]

    def of(self, batch_norm: str) -> FoldEntry:
        """The entry of the batch norm called ``batch_norm`` (its first call site)."""
        for entry in self.entries:
            if entry.batch_norm == batch_norm or entry.batch_norm.startswith(f"{batch_norm} ("):
                return entry
        raise KeyError(f"no batch norm {batch_norm!r} in this report")

    def add(self, batch_norm: str, action: str, target: str = "", reason: str = "") -> None:
        self.entries.append(FoldEntry(batch_norm, action, target, reason))

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s), froze {len(self.frozen)}, left {len(self.left)}"]
        width = max([len(e.batch_norm) for e in self.entries] + [10])
        for e in self.entries:
            what = f"{e.action} {e.target}" if e.action == FOLDED else e.action
            lines.append(f"  {e.batch_norm:<{width}}  {what}" + (f": {e.reason}" if e.reason else ""))
        return "\n".join(lines)
