"""Makes Megatron's checkpoints appear only when complete (installed by ``training.hooks``).

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

A save that fails because the disk is full removes its ``.partial`` directory and stops the run
with one line ("no space left on device", the path, the free space, the checkpoint that is kept)
instead of Megatron's worker traceback.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import shutil
import sys

from megatron_ualm.checkpoint_format import PARTIAL_SUFFIX, TRACKER, iteration_folder
from megatron_ualm.files import atomic_write


def _publish(save_dir: str, content: str) -> None:
    """Renames the finished ``iter_N.partial`` of the iteration the tracker names, if any."""
    if not content.strip().isdigit():
        return
    final = os.path.join(save_dir, iteration_folder(int(content)))
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
            atomic_write(self.path, content)
        super().close()


class _MscWithAtomicTracker:
    """``maybe_msc`` as checkpointing.py uses it, with the tracker written by ``_AtomicTracker``."""

    def __init__(self, msc):
        self._msc = msc

    def open(self, path, mode="r", *args, **kwargs):
        if "w" in mode and isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(TRACKER):
            return _AtomicTracker(os.fspath(path))
        return self._msc.open(path, mode, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._msc, name)


LOW_SPACE_BYTES = 1 << 20


class _ENOSPCWatch(logging.Handler):
    """Notices "No space left on device" in Megatron's checkpoint writer logs during one save.

    Megatron's file-system writer turns a worker's ``OSError`` into a generic "Worker failure ...
    <class 'OSError'>" exception; only its log line keeps the errno.
    """

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.seen = False
        self.logger = logging.getLogger("megatron.core.dist_checkpointing")
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.seen = self.seen or "No space left on device" in text or f"[Errno {errno.ENOSPC}]" in text

    def close(self) -> None:
        self.logger.removeHandler(self)
        super().close()


def _errno_in(err: BaseException, number: int) -> bool:
    """Whether an ``OSError`` with ``number`` is anywhere in the exception's chain (or, for
    torch's ``CheckpointException``, among its per-rank failures)."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == number:
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f for f in failures.values() if isinstance(f, BaseException)]
    return False


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _stop_out_of_space(save_dir: str, iteration: int, err: BaseException) -> None:
    """Removes the half-written save and stops the run with one line; the previous checkpoint,
    the tracker and the data position stay as they were."""
    import torch

    partial = os.path.join(save_dir, iteration_folder(iteration) + PARTIAL_SUFFIX)
    first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if first:
        shutil.rmtree(partial, ignore_errors=True)
        tracker = os.path.join(save_dir, TRACKER)
        kept = open(tracker).read().strip() if os.path.isfile(tracker) else None
        keep = (f"the previous checkpoint (iteration {kept}) is kept and --load {save_dir} resumes from it"
                if kept else "no earlier checkpoint exists")
        print(f"error: no space left on device while saving the iteration-{iteration} checkpoint to {partial} "
              f"({_free_bytes(save_dir) >> 20} MiB free there); {keep}. Free space or point --save at a larger "
              f"filesystem. ({type(err).__name__})", file=sys.stderr, flush=True)
    raise SystemExit(1)


def install(checkpointing, training, wrap) -> None:
    """Installs partial-directory saves and the atomic tracker into ``megatron.training``.

    Args:
        checkpointing: ``megatron.training.checkpointing``.
        training: ``megatron.training.training`` (it calls ``save_checkpoint`` by its own name).
        wrap: ``training.hooks.wrap`` (takes off an earlier run's wrapper first).
    """
    saving = {"now": False}  # whether a save is in progress (names are partial only then)
    wrap(checkpointing, "maybe_msc", _MscWithAtomicTracker)

    def make_name(final_name):
        @functools.wraps(final_name)
        def get_checkpoint_name(checkpoints_path, iteration, release=False, *args, **kwargs):
            name = final_name(checkpoints_path, iteration, release, *args, **kwargs)
            if release or not saving["now"]:
                return name
            base = os.path.join(checkpoints_path, iteration_folder(iteration))
            return base + PARTIAL_SUFFIX + name[len(base):]

        return get_checkpoint_name

    def make_save(save):
        @functools.wraps(save)
        def save_into_partial(iteration, *args, **kwargs):
            saving["now"] = True
            watch = _ENOSPCWatch()
            try:
                return save(iteration, *args, **kwargs)
            except BaseException as err:  # torch's CheckpointException derives from BaseException
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                from megatron.training import get_args

                save_dir = get_args().save
                if watch.seen or _errno_in(err, errno.ENOSPC) or _free_bytes(save_dir) < LOW_SPACE_BYTES:
                    _stop_out_of_space(save_dir, iteration, err)
                raise
            finally:
                watch.close()
                saving["now"] = False

        return save_into_partial

    wrap(checkpointing, "get_checkpoint_name", make_name)
    wrap(checkpointing, "save_checkpoint", make_save)
    wrap(training, "save_checkpoint", make_save)
