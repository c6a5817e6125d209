"""The error a preprocessing step raises for one bad manifest record."""

from __future__ import annotations

from typing import Optional


class RecordError(ValueError):
    """A manifest record that cannot be turned into a training sample.

    Args:
        reason: what is wrong and what a valid value looks like.
        field: the record field at fault (``"audio"``, ``"caption"``, ...), None for the
            whole record.
        source: ``"manifest.jsonl:17"``, filled in by the runner that knows the line.
    """

    def __init__(self, reason: str, field: Optional[str] = None, source: Optional[str] = None):
        self.reason = reason
        self.field = field
        self.source = source
        super().__init__(str(self))

    def at(self, source: str) -> "RecordError":
        """The same error, located at ``source`` (``file:line``)."""
        return RecordError(self.reason, self.field, source)

    def __str__(self) -> str:
        where = self.source or "<record>"
        what = f"field {self.field!r}: " if self.field else ""
        return f"{where}: {what}{self.reason}"

    def to_json(self) -> dict:
        return {"source": self.source, "field": self.field, "reason": self.reason}
