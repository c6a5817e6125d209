"""What every corpus reader shares: input expansion, units and shards, lazy records.

A reader (``Corpus``) counts its units up front (``units``) and, for the shards a task
writes, lists their records as small ``LazyRecord`` references (an archive path and byte
offsets, a row group and row, a cut's manifest entry). The runner hands those to its worker
processes, which read the bytes themselves (``materialize``), build the sample's *view* (the
fields a mapping may name), apply the field mapping and the family's assembly, and convert
the resulting record like a manifest line. So audio bytes never pass through the main
process or a pipe, and a worker holds one step of records at a time whatever the number of
input shards.
"""

from __future__ import annotations

import glob
import os
from abc import ABC, abstractmethod
from typing import Any, Iterator, Optional, Sequence

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.sources.fields import (TEXT_TARGETS, FieldError, FieldMap, MappingMiss, assemble,
                                               available_fields)
from megatron_ualm.data.sources.layout import Layout, Unit

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus")
"""Member / file extensions read as audio (what libsndfile decodes)."""


class CorpusError(ValueError):
    """An input that cannot be read as its format: names the file and what a valid one looks like."""


class NamedBytes(bytes):
    """Encoded audio bytes that remember where they came from, for error messages.

    (A ``bytes`` subclass, not a ``bytearray`` filled by ``readinto``: measured on 10 s FLAC
    clips, ``bytes(bytearray)`` in the decoder's input path cost 1.8 ms a clip, a copy of
    ``bytes`` 0.1 ms.)

    Args:
        data: the encoded file.
        name: ``archive.tar:000123.flac``, ``file.parquet:row 7:audio`` ...
    """

    def __new__(cls, data: bytes, name: str):
        obj = super().__new__(cls, data)
        obj.name = name
        return obj

    def __reduce__(self):
        return NamedBytes, (bytes(self), self.name)


def expand_inputs(patterns: Sequence[str], keep_missing: bool = False) -> list[str]:
    """Inputs with WebDataset brace ranges (``laion-{000000..000099}.tar``) and globs expanded.

    Order: the patterns as given; a glob's matches sorted; a brace range in its own order.

    Args:
        keep_missing: keep a plain path that does not exist (its reader names it) instead of
            raising; patterns must still match.

    Raises:
        CorpusError: a pattern that matches nothing.
    """
    from braceexpand import braceexpand

    out: list[str] = []
    for pattern in patterns:
        for item in braceexpand(pattern):
            if glob.has_magic(item):
                found = sorted(glob.glob(item))
                if not found:
                    raise CorpusError(f"--input {pattern}: {item} matches no file")
                out.extend(found)
            elif not os.path.exists(item) and not (keep_missing and item == pattern):
                raise CorpusError(f"--input {pattern}: {item} does not exist" +
                                  (" (expanded from the brace range)" if item != pattern else ""))
            else:
                out.append(item)
    return out


class LazyRecord:
    """A record located in a corpus and read where it is converted (a worker process).

    Attributes:
        corpus: the reader that knows how to load it (pickled once per batch of records).
        where: ``corpus``-specific location (offsets, row, manifest entry).
    """

    __slots__ = ("corpus", "where")

    def __init__(self, corpus: "Corpus", where: Any):
        self.corpus = corpus
        self.where = where

    def load(self) -> dict:
        """The record as the family's converter reads it.

        Raises:
            RecordError: unreadable bytes, a missing member, a mapping that finds nothing.
        """
        return self.corpus.record(self.where)


def materialize(records: list) -> list:
    """``(source, raw)`` records with every ``LazyRecord`` loaded (a failure stays as its error)."""
    out = []
    for source, raw in records:
        if isinstance(raw, LazyRecord):
            try:
                raw = raw.load()
            except RecordError as err:
                raw = err
        out.append((source, raw))
    return out


class Corpus(ABC):
    """A reader of one input format.

    Args:
        inputs: the ``--input`` values (patterns allowed).
        fields: the run's field mapping.
        family: the data family the records are for (``generation``, ``understanding``, ...).
        audio_root: where relative audio paths (and the WavCaps audio) are.
    """

    format: str = ""
    needs_audio = ("generation", "understanding")
    folder_hint: Optional[str] = None
    """Formats whose inputs are files: what to give instead of a folder ``{f}`` (None: folders allowed)."""

    def __init__(self, inputs: Sequence[str], fields: FieldMap, family: str, audio_root: str):
        self.inputs = list(inputs)
        self.fields = fields
        self.family = family
        self.audio_root = audio_root
        self.files = self.find_files(self.inputs)
        self._units: Optional[list[Unit]] = None

    def __getstate__(self) -> dict:
        # A worker gets the settings only (pickled once per batch of records it is sent): the
        # input lists, unit counts, indexes and open files stay in the process that made them.
        return {k: self.__dict__[k] for k in ("fields", "family", "audio_root")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._units = None

    # -- main process: counting and listing ------------------------------------------------
    def find_files(self, inputs: Sequence[str]) -> list[str]:
        """The concrete input files (their sizes go into the run key)."""
        files = expand_inputs(inputs)
        for f in files:
            if self.folder_hint is not None and os.path.isdir(f):
                raise CorpusError(f"--input {f} is a directory; give " + self.folder_hint.format(f=f))
        return files

    @abstractmethod
    def count_units(self) -> list[Unit]:
        """Every unit with its record count, without decoding audio."""

    @abstractmethod
    def read_unit(self, u: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Any]]:
        """``(local index, source, raw)`` of unit ``u``'s records in the ``[a, b)`` ranges, in order.

        ``raw`` is a ``LazyRecord``, a dict, or a ``RecordError`` for a record that cannot be
        listed (a truncated archive).
        """

    def units(self) -> list[Unit]:
        if self._units is None:
            self._units = self.count_units()
        return self._units

    def layout(self, per_shard: int) -> Layout:
        return Layout(self.units(), per_shard)

    def identity(self) -> dict:
        """Format and mapping: part of the run key (and the shard sidecars' source)."""
        return {"format": self.format, "fields": self.fields.identity(), "family": self.family}

    def read_shards(self, layout: Layout, wanted: Sequence[int]) -> Iterator[tuple[int, list]]:
        """``(shard index, [(source, raw), ...])`` of the wanted shards, in order; other units are not read."""
        wanted = sorted(set(wanted))
        if not wanted:
            return
        spans = [(layout.first(k), layout.first(k) + layout.size(k), k) for k in wanted]
        chunks: dict[int, list] = {}
        g = 0
        si = 0  # first span that may still overlap
        for u, unit in enumerate(self.units()):
            a, b = g, g + unit.records
            g = b
            while si < len(spans) and spans[si][1] <= a:
                si += 1
            ranges = []
            for lo, hi, _ in spans[si:]:
                if lo >= b:
                    break
                ranges.append((max(lo, a) - a, min(hi, b) - a))
            if not ranges:
                continue
            for local, source, raw in self.read_unit(u, _merge(ranges)):
                k = layout.shard_of(a + local)
                chunks.setdefault(k, []).append((source, raw))
            # A shard is complete once no later unit reaches into it.
            for k in sorted(chunks):
                if layout.first(k) + layout.size(k) <= b:
                    yield k, chunks.pop(k)
        for k in sorted(chunks):
            yield k, chunks.pop(k)

    def first_record(self) -> Optional[tuple[str, Any]]:
        """The corpus's first record, for the up-front mapping check (None: no records)."""
        for u, unit in enumerate(self.units()):
            if unit.records:
                for _, source, raw in self.read_unit(u, [(0, 1)]):
                    return source, raw
        return None

    def check_mapping(self) -> None:
        """Applies the mapping to the first record: a mapping that finds nothing there stops the run.

        Raises:
            FieldError: naming the mapping, the record and the fields it has.
        """
        first = self.first_record()
        if first is None:
            return
        try:
            if isinstance(first[1], MappingMiss):
                raise first[1]
            if isinstance(first[1], LazyRecord):
                first[1].load()
        except MappingMiss as err:
            raise FieldError(f"{first[0]}: {err.reason}") from None
        except RecordError:
            pass  # a bad first record is rejected like any other
        finally:
            self.release()

    def release(self) -> None:
        """Closes the files and drops the data a reader keeps between records (a row group)."""
        for handle in self.__dict__.pop("_handles", {}).values():
            handle.close()
        self.__dict__.pop("_rows", None)

    # -- worker: loading ---------------------------------------------------------------------
    @abstractmethod
    def view(self, where: Any) -> tuple[dict, dict, str]:
        """``(view, default record, description)`` of one located record (reads its bytes)."""

    def mapping(self) -> FieldMap:
        """The mappings applied to each view (all of ``fields`` unless a reader used some itself)."""
        return self.fields

    def record(self, where: Any) -> dict:
        """The family's record: the default record with the mapping applied, then assembled.

        Raises:
            MappingMiss: no mapping names the family's text (``TEXT_TARGETS``) and the sample has
                none under those names: a run whose first record this is stops (``check_mapping``).
            RecordError: no audio, or what ``assemble`` finds.
        """
        view, record, what = self.view(where)
        mapping = self.mapping()
        record = mapping.apply(view, record, what)
        if self.family in self.needs_audio and all(record.get(k) is None for k in ("audio", "sound", "codes")):
            raise RecordError(f"is missing: {what} has no audio; its fields are: {available_fields(view)} (map one "
                              "with --field audio=...)", "audio")
        if self.family in TEXT_TARGETS:
            targets, needed, example = TEXT_TARGETS[self.family]
            if all(record.get(t) is None and mapping.get(t) is None for t in targets):
                raise MappingMiss(f"no --field maps the {needed} and {what} has no field named "
                                  f"{' or '.join(targets)}; its fields are: {available_fields(view)} (map one with "
                                  f"{example}, or choose a --preset)", targets[0])
        return assemble(record, self.family)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[a, b)`` ranges, joined where they touch."""
    out: list[tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out

