"""Makes Megatron's checkpoints appear only when complete.

Megatron writes ``iter_XXXXXXX/`` and then ``latest_checkpointed_iteration.txt``, so a run
killed during a save leaves the tracker on the previous iteration. Two gaps remain, closed
here:

- the half-written ``iter_XXXXXXX/`` is visible under its final name. Saves now go to
  ``iter_XXXXXXX.partial/``; once every rank has written (Megatron's finalize step, on rank 0,
  also after an async save) the directory is renamed to its final name, and only then is the
  tracker updated;
- the tracker is rewritten in place (``open(path, 'w')``): a kill between truncation and write
  leaves it empty, and the next ``--load`` exits with "Invalid metadata file". It is now
  written to a temporary file and renamed over the old one.
"""

from __future__ import annotations

import functools
import io
import os
import shutil

TRACKER_NAME = "latest_checkpointed_iteration.txt"
PARTIAL_SUFFIX = ".partial"


def _publish(save_dir: str, content: str) -> None:
    """Renames the finished ``iter_N.partial`` of the iteration the tracker names, if any."""
    if not content.strip().isdigit():
        return
    final = os.path.join(save_dir, "iter_{:07d}".format(int(content)))
    partial = final + PARTIAL_SUFFIX
    if os.path.isdir(partial):
        if os.path.isdir(final):  # the same iteration saved again (e.g. after a resume)
            shutil.rmtree(final)
        os.rename(partial, final)


class _AtomicTracker(io.StringIO):
    """Collects the tracker's text; on close publishes the checkpoint, then the tracker."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def close(self) -> None:
        if not self.closed:
            content = self.getvalue()
            _publish(os.path.dirname(self.path), content)
            tmp = f"{self.path}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        super().close()


class _MscWithAtomicTracker:
    """``maybe_msc`` as checkpointing.py uses it, with the tracker written by ``_AtomicTracker``."""

    def __init__(self, msc):
        self._msc = msc

    def open(self, path, mode="r", *args, **kwargs):
        if "w" in mode and isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(TRACKER_NAME):
            return _AtomicTracker(os.fspath(path))
        return self._msc.open(path, mode, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._msc, name)


def make_checkpoints_atomic() -> None:
    """Installs partial-directory saves and the atomic tracker into ``megatron.training``."""
    from megatron.training import checkpointing, training

    if isinstance(checkpointing.maybe_msc, _MscWithAtomicTracker):
        return
    checkpointing.maybe_msc = _MscWithAtomicTracker(checkpointing.maybe_msc)
    final_name = checkpointing.get_checkpoint_name
    save = checkpointing.save_checkpoint

    @functools.wraps(final_name)
    def partial_name(checkpoints_path, iteration, release=False, *args, **kwargs):
        name = final_name(checkpoints_path, iteration, release, *args, **kwargs)
        if release:
            return name
        base = os.path.join(checkpoints_path, "iter_{:07d}".format(iteration))
        return base + PARTIAL_SUFFIX + name[len(base):]

    @functools.wraps(save)
    def save_into_partial(*args, **kwargs):
        checkpointing.get_checkpoint_name = partial_name
        try:
            return save(*args, **kwargs)
        finally:
            checkpointing.get_checkpoint_name = final_name

    checkpointing.save_checkpoint = save_into_partial
    training.save_checkpoint = save_into_partial
