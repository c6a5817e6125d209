"""WebDataset tar shards, read in place: ``shards/laion-{000000..000099}.tar``.

Samples follow WebDataset's rules: regular members only, ``__*__`` metadata skipped, a
member's key is its path up to the first dot of its file name and its extension the rest
(lower-cased), consecutive members with one key form a sample. The sample's *view* is
``{"__key__": key, "json": <parsed json member>, "flac": <bytes>, "txt": <text>, ...}``; its
default record is the json member's fields plus ``audio``, the one member whose extension ends
in flac, wav, mp3, ogg or opus. ``--field`` expressions read the view (``caption=json.caption``).

Why ``tarfile`` with byte offsets and not the ``webdataset`` package's pipeline: WebDataset
streams every byte of an archive to find its samples, while a seekable ``tarfile`` reads only
the 512-byte headers and seeks over member data, so the up-front count (progress total, the
task split) costs one header read per member and decodes no audio. The main process lists a
shard's samples as (archive, offsets) references and the worker that converts them reads the
bytes itself, so audio never crosses a pipe and a worker's memory does not grow with the
number of archives. Reading headers ourselves also lets a truncated archive be reported
member by member: samples before the damage are kept, a member cut short and the unreadable
rest are each a rejected record naming the archive and key. (The ``webdataset`` package is a
test dependency: its ``TarWriter`` writes the archives these readers are tested on.)
Compressed archives (``.tar.gz``) cannot be read by offset; audio members are compressed
already, so ``gunzip`` them once.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.sources.base import AUDIO_EXTENSIONS, Corpus, CorpusError, LazyRecord, NamedBytes
from megatron_ualm.data.sources.layout import Unit

TEXT_EXTENSIONS = ("txt", "text", "cls", "caption")
"""Members read as UTF-8 text in a sample's view (the rest, but json, are bytes)."""

_META = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset.tariterators.base_plus_ext


@dataclass(frozen=True)
class Member:
    """A regular file in an archive: its name and where its data lies."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class Scan:
    """An archive's members, read from its headers.

    Attributes:
        members: regular files, in archive order.
        problem: why the archive ends early (truncated, a damaged header, not a tar), or None.
        size: the file's size in bytes.
    """

    members: tuple
    problem: Optional[str]
    size: int


def scan_tar(path: str) -> Scan:
    """Reads an archive's headers without reading member data.

    A complete archive ends with a zero block. A file cut inside member data, inside a
    header, or exactly between members lacks it; a damaged header stops ``tarfile`` early.
    Each case is returned as ``problem``; the members before it are listed.
    """
    size = os.path.getsize(path)
    members: list[Member] = []
    try:
        tf = tarfile.open(path, "r:")
    except tarfile.ReadError as err:
        return Scan((), f"is not a readable tar archive ({err}; {size} bytes)", size)
    with tf:
        problem = None
        while True:
            try:
                info = tf.next()
            except tarfile.ReadError as err:  # a member's data or a header chain runs past the end, or is garbled
                last = f"its member {members[-1].name}" if members else "its start"
                problem = (f"is truncated or damaged after {last} ({err}; the file is {size} bytes); "
                           "the members after that are lost")
                break
            if info is None:
                break
            tf.members = []  # tarfile keeps every header otherwise; a worker's memory stays flat
            if info.isreg():
                members.append(Member(info.name, info.offset_data, info.size))
        if problem is None:
            tf.fileobj.seek(tf.offset)
            block = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE:
                problem = (f"is truncated: the file ends at byte {size}, at or inside the header at byte {tf.offset}, "
                           "without the end-of-archive marker; members after that are lost")
            elif block.count(0) != tarfile.BLOCKSIZE:
                problem = f"has a damaged member header at byte {tf.offset}; the members after it cannot be read"
    return Scan(tuple(members), problem, size)


@dataclass(frozen=True)
class Sample:
    """One WebDataset sample: its key, ``(extension, Member)`` pairs, or why it is unreadable."""

    key: str
    members: tuple
    error: Optional[str] = None


def samples(scan: Scan) -> list[Sample]:
    """The archive's samples by WebDataset's grouping rules (see the module docstring)."""
    out: list[Sample] = []
    key, parts, error = None, [], None

    def close() -> None:
        if key is not None:
            out.append(Sample(key, tuple(parts), error))

    for m in scan.members:
        if _META.match(m.name):
            continue
        match = _KEY_EXT.match(m.name)
        if match is None:
            continue  # no extension: not part of any sample (as in WebDataset)
        k, ext = match.group(1), match.group(2).lower()
        if k != key:
            close()
            key, parts, error = k, [], None
        if any(e == ext for e, _ in parts):
            error = f"holds two members {m.name} (duplicate extension .{ext})"
        if m.offset + m.size > scan.size and error is None:
            error = (f"member {m.name} is cut short: its data needs bytes {m.offset}..{m.offset + m.size} but the "
                     f"archive ends at byte {scan.size} (a truncated download; fetch the archive again)")
        parts.append((ext, m))
    close()
    return out


class WebDatasetCorpus(Corpus):
    """WebDataset tar shards (see the module docstring); each archive is a unit one task reads whole."""

    format = "webdataset"
    folder_hint = "the tar shards, e.g. {f}/*.tar or {f}/name-{{000000..000099}}.tar"

    def find_files(self, inputs: Sequence[str]) -> list[str]:
        files = super().find_files(inputs)
        for f in files:
            if f.endswith((".tar.gz", ".tgz")):
                raise CorpusError(f"--input {f} is a compressed tar, which cannot be read by offset; its audio is "
                                  f"compressed already, so store it uncompressed once: gunzip {f}")
        return files

    def count_units(self) -> list[Unit]:
        return [Unit(len(self._records(path)), whole=True) for path in self.files]

    def _records(self, path: str) -> list[tuple[str, Any]]:
        """``(source, raw)`` of every record of one archive: its samples, then its problem, if any."""
        scan = scan_tar(path)
        out: list[tuple[str, Any]] = []
        grouped = samples(scan)
        for s in grouped:
            source = f"{path}:{s.key}"
            if s.error is not None:
                out.append((source, RecordError(s.error)))
            else:
                out.append((source, LazyRecord(self, (path, s.key, s.members))))
        if scan.problem is not None:
            after = f"after {grouped[-1].key}" if grouped else "start"
            out.append((f"{path}:<{after}>", RecordError(f"the archive {scan.problem}")))
        return out

    def read_unit(self, u: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Any]]:
        for i, (source, raw) in enumerate(self._records(self.files[u])):
            if i >= ranges[-1][1]:
                return
            if any(a <= i < b for a, b in ranges):
                yield i, source, raw

    def _file(self, path: str):
        """An open handle on ``path`` (a few are kept: a step's records share an archive)."""
        handles = self.__dict__.setdefault("_handles", collections.OrderedDict())
        if path in handles:
            handles.move_to_end(path)
            return handles[path]
        while len(handles) >= 4:
            handles.popitem(last=False)[1].close()
        handles[path] = open(path, "rb")
        return handles[path]

    def view(self, where) -> tuple[dict, dict, str]:
        path, key, members = where
        what = f"sample {key} of {path}"
        f = self._file(path)
        view: dict[str, Any] = {"__key__": key}
        for ext, m in members:
            data = os.pread(f.fileno(), m.size, m.offset)
            if len(data) != m.size:
                raise RecordError(f"member {m.name} is cut short ({len(data)} of {m.size} bytes): the archive "
                                  "changed or is truncated")
            kind = ext.rsplit(".", 1)[-1]  # WebDataset decodes by the last extension: meta.json is JSON
            if kind == "json":
                try:
                    view[ext] = json.loads(data)
                except ValueError as err:
                    raise RecordError(f"member {m.name} is not valid JSON ({err})", ext) from None
            elif kind in TEXT_EXTENSIONS:
                try:
                    view[ext] = data.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise RecordError(f"member {m.name} is not UTF-8 text ({err.reason})", ext) from None
            else:
                view[ext] = NamedBytes(data, f"{path}:{m.name}")
        names = ", ".join(m.name for _, m in members)
        if "json" not in view and not self.fields.fields:
            raise RecordError(f"{what} has no .json member (its members: {names}); the metadata comes from "
                              f"{key}.json, or map fields from other members with --field", "json")
        record = dict(view["json"]) if isinstance(view.get("json"), dict) else {}
        audio = [ext for ext in view if ext.rsplit(".", 1)[-1] in AUDIO_EXTENSIONS]
        if len(audio) == 1:
            record["audio"] = view[audio[0]]
        elif len(audio) > 1 and self.fields.get("audio") is None:
            raise RecordError(f"{what} has several audio members ({names}); choose one, e.g. --field "
                              f"audio={audio[0]}", "audio")
        return view, record, what
