"""Makes Megatron's checkpoint commit point atomic.

Megatron writes ``iter_XXXXXXX/`` first and then ``latest_checkpointed_iteration.txt``, so a
run killed during a save leaves the tracker on the previous iteration, which stays loadable.
The tracker itself is rewritten in place (``open(path, 'w')``), though: a kill between the
truncation and the write leaves an empty tracker and the next ``--load`` exits with "Invalid
metadata file". Here the tracker is written to a temporary file and renamed over the old one,
so it always names a complete checkpoint.
"""

from __future__ import annotations

import io
import os

TRACKER_NAME = "latest_checkpointed_iteration.txt"


class _AtomicTextFile(io.StringIO):
    """Collects text and publishes it with ``os.replace`` on close."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def close(self) -> None:
        if not self.closed:
            tmp = f"{self.path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(self.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        super().close()


class _MscWithAtomicTracker:
    """``maybe_msc`` as checkpointing.py uses it, with atomic writes of the tracker file."""

    def __init__(self, msc):
        self._msc = msc

    def open(self, path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(TRACKER_NAME) and isinstance(path, (str, os.PathLike)):
            return _AtomicTextFile(os.fspath(path))
        return self._msc.open(path, mode, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._msc, name)


def make_tracker_writes_atomic() -> None:
    """Installs the atomic tracker write into ``megatron.training.checkpointing``."""
    from megatron.training import checkpointing

    if not isinstance(checkpointing.maybe_msc, _MscWithAtomicTracker):
        checkpointing.maybe_msc = _MscWithAtomicTracker(checkpointing.maybe_msc)
