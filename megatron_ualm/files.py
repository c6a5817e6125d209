"""Files that readers never see half-written, and JSON Lines input with errors that name the line.

Every output of this project that a later step reads (shard sidecars, blends, task records,
checkpoint trackers, reports, manifests, cached arrays) is written through ``atomic_file``: the
bytes go to a temporary name beside the target, are flushed to disk, and the name is swapped in
with ``os.replace``. A kill at any moment leaves either the old file or the new one. The
temporary name carries the host and pid, so tasks on several nodes writing into one shared folder
never collide, and keeps the target's extension (``np.save``, ``np.savez`` and ``soundfile``
choose their format, or append one, by it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Iterator, Union

PARTIAL = "partial"
"""The marker in temporary names (``<stem>.<host>-<pid>.partial<ext>``)."""


def temporary_name(path: str) -> str:
    """The name ``atomic_file`` writes ``path`` under before renaming it (same folder and extension)."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.{socket.gethostname()}-{os.getpid()}.{PARTIAL}{ext}"


def partial_dir(path: str) -> str:
    """Where a directory that must appear complete (a shard, a converted checkpoint) is built
    before it is renamed to ``path``: a hidden sibling, ``.<name>.partial``."""
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{PARTIAL}")


def _fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yields a temporary path to write ``path``'s content to; on success it replaces ``path``.

    The folder is created. If the block raises, the temporary file is removed and ``path`` is
    left as it was.

    Example::

        with atomic_file("stats.npz") as tmp:
            np.savez(tmp, mu=mu)
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write(path: str, data: Union[str, bytes]) -> str:
    """Writes ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def atomic_json(path: str, obj: Any, indent: int = 1, **kwargs: Any) -> str:
    """Writes ``obj`` as JSON (``json.dumps`` keyword arguments allowed) atomically; returns ``path``."""
    return atomic_write(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def jsonl_text(records) -> str:
    """JSON Lines text of ``records`` (one compact object per line, UTF-8 kept as is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def read_jsonl(path: str) -> list[tuple[int, Any]]:
    """``(line number, record)`` of a JSON Lines file, blank lines skipped.

    A file holding one JSON list (some benchmarks ship one, e.g. MMAU) gives ``(item number,
    item)`` pairs instead.

    Raises:
        ValueError: a line (or the file) that is not valid JSON, naming ``file:line``.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return out
