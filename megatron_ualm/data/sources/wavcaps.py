"""WavCaps-style corpora: JSON metadata files beside a folder or a zip of audio.

WavCaps ships one JSON file per subset (``{"num_captions_per_audio": 1, "data": [{"id":
"Yb0RFKhbpFJA.wav", "caption": "...", "duration": 10.0, ...}, ...]}``) and the audio in zip
archives. ``--input`` is the JSON file(s) (a top-level list of entries is read too);
``--audio-root`` the audio folder or ``.zip``. An entry's *view* and default record are its own
fields; the ``audio`` mapping (default ``id``) names its file, found in the folder or zip by
relative path, then by file name, then by stem (``Yb0RFKhbpFJA.wav`` finds
``AudioSet_SL/Yb0RFKhbpFJA.flac``). A name that finds no file, or several, rejects the entry.

The main process reads the zip's directory once and hands each worker the member's offset;
the worker reads and inflates just that member, so a zip of any size is never extracted.
WavCaps' multi-part zips (``.zip`` + ``.z01`` ...) must be joined first:
``zip -s 0 AudioSet_SL.zip --out AudioSet_SL_joined.zip``.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
import zlib
from typing import Any, Iterator, Optional, Sequence

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.sources.base import AUDIO_EXTENSIONS, Corpus, CorpusError, LazyRecord, NamedBytes
from megatron_ualm.data.sources.fields import FieldMap, MappingMiss, NotFound, parse_expression
from megatron_ualm.data.sources.layout import Unit

DEFAULT_AUDIO = "id"
"""The field that names an entry's audio file when ``--field audio=...`` is not given."""


def _stem(name: str) -> str:
    base = os.path.basename(name)
    head, dot, ext = base.rpartition(".")
    return head if dot and ext.lower() in AUDIO_EXTENSIONS else base


class AudioIndex:
    """The audio files of a folder or a zip, looked up by relative path, file name or stem."""

    def __init__(self, root: str):
        self.root = root
        self.zip = root if os.path.isfile(root) else None
        entries: list[tuple[str, Any]] = []
        if self.zip is not None:
            try:
                with zipfile.ZipFile(root) as z:
                    entries = [(i.filename, i) for i in z.infolist() if not i.is_dir()]
            except zipfile.BadZipFile as err:
                parts = [p for p in (root[:-4] + ".z01", root[:-4] + ".z1") if os.path.exists(p)]
                hint = (f"; it is one part of a split archive ({parts[0]} ...): join the parts with "
                        f"zip -s 0 {root} --out joined.zip") if parts else ""
                raise CorpusError(f"--audio-root {root} is not a readable zip archive ({err}){hint}") from None
        elif os.path.isdir(root):
            for d, _, names in os.walk(root):
                entries.extend((os.path.relpath(os.path.join(d, n), root), os.path.join(d, n)) for n in names)
        else:
            raise CorpusError(f"--audio-root {root} does not exist; give the WavCaps audio folder or its .zip")
        self.by_path: dict[str, Any] = {}
        self.by_name: dict[str, list] = {}
        self.by_stem: dict[str, list] = {}
        for rel, where in entries:
            if rel.rpartition(".")[2].lower() not in AUDIO_EXTENSIONS:
                continue
            self.by_path[rel] = (rel, where)
            self.by_name.setdefault(os.path.basename(rel), []).append((rel, where))
            self.by_stem.setdefault(_stem(rel), []).append((rel, where))

    def find(self, name: str) -> Any:
        """The location of ``name``'s file (a path, or a zip member's ``ZipInfo``).

        Raises:
            RecordError: no file, or several, match.
        """
        hit = self.by_path.get(name)
        if hit is not None:
            return hit[1]
        for table, key in ((self.by_name, os.path.basename(name)), (self.by_stem, _stem(name))):
            found = table.get(key, [])
            if len(found) == 1:
                return found[0][1]
            if len(found) > 1:
                raise RecordError(f"{name!r} matches {len(found)} files in {self.root} "
                                  f"({', '.join(r for r, _ in found[:3])}); map audio to the relative path", "audio")
        raise RecordError(f"no audio file for {name!r} in {self.root} (looked for it by path, file name and stem "
                          f"{_stem(name)}.*)", "audio")


def read_zip_member(path: str, info: zipfile.ZipInfo) -> bytes:
    """One member's bytes, read at its offset (stored or deflated; other methods through ``zipfile``)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise RecordError(f"{path}: no local header for {info.filename} at byte {info.header_offset} "
                              "(a damaged or truncated zip)", "audio")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        raw = f.read(info.compress_size)
    if len(raw) != info.compress_size:
        raise RecordError(f"{path}: member {info.filename} is cut short (a truncated zip)", "audio")
    if info.compress_type == zipfile.ZIP_STORED:
        return raw
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return zlib.decompressobj(-15).decompress(raw)
    with zipfile.ZipFile(path) as z:
        return z.read(info)


def entries(path: str) -> list:
    """The metadata entries of a WavCaps JSON file (``data`` of an object, or a top-level list).

    Raises:
        CorpusError: not JSON, or neither shape.
    """
    try:
        with open(path) as f:
            blob = json.load(f)
    except ValueError as err:
        raise CorpusError(f"--input {path} is not a JSON file ({err}); WavCaps metadata is "
                          '{"data": [{"id": ..., "caption": ...}, ...]}') from None
    data = blob.get("data") if isinstance(blob, dict) else blob
    if not isinstance(data, list):
        raise CorpusError(f"--input {path}: expected {{\"data\": [entries]}} or a list of entries, got "
                          f"{type(blob).__name__} with keys {sorted(blob)[:8] if isinstance(blob, dict) else ''}")
    return data


class WavCapsCorpus(Corpus):
    """JSON metadata + an audio folder or zip; each JSON file is a record stream."""

    format = "wavcaps"

    def count_units(self) -> list[Unit]:
        return [Unit(len(entries(p)), whole=False) for p in self.files]

    def mapping(self) -> FieldMap:
        return self.fields.without("audio")  # it named the file, which read_unit found already

    def _index(self) -> AudioIndex:
        if self.__dict__.get("_audio") is None:
            self._audio = AudioIndex(self.audio_root)
        return self._audio

    def read_unit(self, u: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Any]]:
        path = self.files[u]
        expr = self.fields.get("audio") or parse_expression(DEFAULT_AUDIO)
        index = self._index()
        data = entries(path)
        for a, b in ranges:
            for i in range(a, min(b, len(data))):
                entry = data[i]
                source = f"{path}:data[{i}]"
                if not isinstance(entry, dict):
                    yield i, source, RecordError(f"an entry must be an object, got {type(entry).__name__}")
                    continue
                if entry.get("id") is not None:
                    source += f" (id {entry['id']})"
                try:
                    name = expr.evaluate(entry)
                except NotFound:
                    yield i, source, MappingMiss(f"the mapping audio={expr.text} finds nothing in the entry; its "
                                                 f"fields are: {', '.join(map(str, entry))}", "audio")
                    continue
                if not isinstance(name, str):
                    yield i, source, RecordError(f"audio={expr.text} must name a file, got {type(name).__name__}",
                                                 "audio")
                    continue
                try:
                    where = index.find(name)
                except RecordError as err:
                    yield i, source, err
                    continue
                location: Optional[tuple] = (index.zip, where) if index.zip is not None else None
                yield i, source, LazyRecord(self, (entry, location or where, f"entry {i} of {path}"))

    def view(self, where) -> tuple[dict, dict, str]:
        entry, location, what = where
        if isinstance(location, tuple):
            zip_path, info = location
            audio: Any = NamedBytes(read_zip_member(zip_path, info), f"{zip_path}:{info.filename}")
        else:
            audio = location
        return entry, {**entry, "audio": audio}, what
