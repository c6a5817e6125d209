"""JSONL / Parquet manifests with a field mapping (``--field`` on the manifests the tools always read).

Without a mapping the tools read manifests directly (``megatron_ualm.data.preprocess``); with
one, this reader lists the same records in the same shards (a manifest is a record stream)
and each worker parses its records and applies the mapping before converting them.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.sources.base import Corpus, LazyRecord
from megatron_ualm.data.sources.layout import Unit


class ManifestCorpus(Corpus):
    """JSONL / Parquet manifests read with a field mapping."""

    format = "manifest"

    def count_units(self) -> list[Unit]:
        from megatron_ualm.data.preprocess import open_manifest

        self._manifests = [open_manifest(p) for p in self.files]
        return [Unit(m.records, whole=False) for m in self._manifests]

    def read_unit(self, u: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Any]]:
        from megatron_ualm.data.preprocess import read_shards

        self.units()
        wanted = [i for a, b in ranges for i in range(a, b)]
        for i, [(source, raw)] in read_shards([self._manifests[u]], 1, wanted):
            yield i, source, raw if isinstance(raw, RecordError) else LazyRecord(self, raw)

    def view(self, where) -> tuple[dict, dict, str]:
        from megatron_ualm.data.records import parse_record

        rec = parse_record(where)
        return rec, dict(rec), "the record"
