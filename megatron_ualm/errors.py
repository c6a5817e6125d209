"""Errors a user can act on; entry points print them as one line (no traceback)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read or used as asked; the message says what to do."""
