"""Hugging Face Parquet as the Hub stores audio datasets: an ``audio`` struct and free columns.

The ``datasets`` library writes its ``Audio`` feature as a struct ``{bytes: binary, path:
string}``; captions, transcripts and ids are ordinary columns whose names differ between
corpora (``caption``, ``captions``, ``text``, ``sentence`` ...), so ``--field`` names them.
A row's *view* is its columns, with every ``{bytes, path}`` struct kept as such (the bytes
remember their file and row for error messages); its default record is the same columns, so
a dump with ``audio`` and ``caption`` columns needs no mapping. A row whose struct has no
bytes falls back to its ``path``, resolved against ``--audio-root``.

Each row group is a unit one task reads whole (the row counts come from the file footer). The
worker that converts a row reads its row group once and keeps it until the next one is
needed, so a worker holds at most one row group.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from megatron_ualm.data.sources.base import Corpus, CorpusError, LazyRecord, NamedBytes
from megatron_ualm.data.sources.layout import Unit


class HFParquetCorpus(Corpus):
    """Hugging Face audio Parquet files; row groups are the units tasks own."""

    format = "hf-parquet"
    folder_hint = ("its Parquet files, e.g. {f}/train-*.parquet (a glob per split: train, validation and test files "
                   "sit side by side)")

    def count_units(self) -> list[Unit]:
        import pyarrow.parquet as pq

        units, groups = [], []
        for path in self.files:
            try:
                meta = pq.ParquetFile(path).metadata
            except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for foreign bytes
                raise CorpusError(f"--input {path} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
            row = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                units.append(Unit(n, whole=True))
                groups.append((path, g, row))
                row += n
        self._groups = groups
        return units

    def read_unit(self, u: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Any]]:
        self.units()
        path, group, first_row = self._groups[u]
        for a, b in ranges:
            for i in range(a, b):
                yield i, f"{path}:row {first_row + i}", LazyRecord(self, (path, group, i, first_row + i))

    def view(self, where) -> tuple[dict, dict, str]:
        import pyarrow.parquet as pq

        path, group, i, row = where
        cached = self.__dict__.get("_rows")
        if cached is None or cached[0] != (path, group):
            self.__dict__["_rows"] = None  # free the previous row group before reading the next
            cached = self.__dict__["_rows"] = ((path, group), pq.ParquetFile(path).read_row_group(group).to_pylist())
        view = dict(cached[1][i])
        for column, value in view.items():
            if isinstance(value, dict) and "bytes" in value and isinstance(value["bytes"], (bytes, bytearray)):
                name = f"{path}:row {row}:{column}" + (f" ({value['path']})" if value.get("path") else "")
                view[column] = {**value, "bytes": NamedBytes(bytes(value["bytes"]), name)}
        return view, dict(view), f"row {row} of {path}"
