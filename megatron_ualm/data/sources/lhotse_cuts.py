"""Lhotse corpora, read through ``lhotse``: CutSet manifests and Shar directories.

A cut is one record. Its *view* is the cut as ``lhotse`` serialises it (``id``, ``start``,
``duration``, ``supervisions[i].text``, ``custom.*``, ``recording.*``); its default record is
``audio`` + ``start`` / ``end`` (the cut's span of its recording) and ``transcript`` (the
supervisions' text, joined with spaces in their order), which the generation family takes as
the caption and the understanding family as the answer (``fields.assemble``).

- **CutSet manifests** (``cuts.jsonl.gz``, ``cuts.jsonl``): each line is parsed by
  ``lhotse.serialization.deserialize_item``; the audio is the recording's one file source
  (relative paths against ``--audio-root``), read from ``start`` to ``start + duration``. A
  manifest is a record stream: its cuts fill shards like manifest lines. Cuts that this
  reader cannot reproduce exactly are rejected with the reason (mixed or padding cuts,
  recordings with several sources or transforms other than resampling, a cut that takes a
  subset of a multi-channel recording, URL or command sources).
- **Shar directories** (``cuts.000000.jsonl.gz`` + ``recording.000000.tar`` + custom fields,
  as ``CutSet.to_shar`` writes them): the shard list comes from ``lhotse``'s own
  ``LazySharIterator`` and cuts and their JSONL custom fields are read through it; the audio
  of cut ``i`` is the ``i``-th data member of the shard's recording tar (already the cut's
  span), located by its header and read by offset in the worker (see ``tar.py`` for why). A
  Shar shard is a unit one task reads whole.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Sequence

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.sources.base import Corpus, CorpusError, LazyRecord, NamedBytes
from megatron_ualm.data.sources.layout import Unit
from megatron_ualm.data.sources.tar import scan_tar

def manifest_lines(path: str) -> Iterator[tuple[int, Any]]:
    """``(line number, text)`` of every non-blank line of a (gzipped) JSONL file, then
    ``(line number, RecordError)`` once if the file is damaged (a truncated gzip stream)."""
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as err:
        yield lineno + 1, RecordError(f"the manifest {path} cannot be read past line {lineno} ({err}); the cuts "
                                      "after it are lost: fetch or write the file again")


def cut_record(cut: Any, audio_root: str) -> tuple[dict, dict]:
    """``(view, default record)`` of a cut from a CutSet manifest (see the module docstring).

    Raises:
        RecordError: a cut whose audio this reader cannot read exactly as Lhotse would.
    """
    from lhotse import MonoCut

    if not isinstance(cut, MonoCut):
        raise RecordError(f"is a {type(cut).__name__}; only MonoCuts (one recording span) can be read: "
                          "mix or pad the audio into recordings first", "type")
    rec = cut.recording
    if rec is None:
        raise RecordError("is missing: the cut has no recording", "recording")
    if len(rec.sources) != 1:
        raise RecordError(f"has {len(rec.sources)} sources (one file per channel); give recordings with one "
                          "(multi-channel) file", "recording.sources")
    names = [t.get("name") if isinstance(t, dict) else type(t).__name__ for t in (rec.transforms or [])]
    if any(n != "Resample" for n in names):
        raise RecordError(f"has transforms {names}; only resampling is reproduced (the audio is resampled to the "
                          "model's rate anyway): apply the others with CutSet.save_audios() first",
                          "recording.transforms")
    channels = sorted(cut.channel if isinstance(cut.channel, list) else [cut.channel])
    if rec.num_channels > 1 and channels != sorted(rec.channel_ids):
        raise RecordError(f"takes channel(s) {channels} of a {rec.num_channels}-channel recording; the audio is "
                          "read as the mean of all channels, so give one channel per recording", "channel")
    source = rec.sources[0]
    if source.type == "file":
        audio = source.source if os.path.isabs(source.source) else os.path.join(audio_root, source.source)
    elif source.type == "memory" and isinstance(source.source, (bytes, bytearray)):
        audio = NamedBytes(bytes(source.source), f"cut {cut.id}'s in-memory recording")
    else:
        raise RecordError(f"has a {source.type!r} audio source; give local files ('file' sources) or Lhotse Shar",
                          "recording.sources")
    view = cut.to_dict()
    transcript = " ".join(s.text.strip() for s in cut.supervisions if s.text and s.text.strip()) or None
    record = {"audio": audio, "start": cut.start, "end": cut.start + cut.duration, "id": cut.id}
    if transcript is not None:
        record["transcript"] = transcript
    return view, record


class LhotseCutsCorpus(Corpus):
    """Lhotse CutSet manifests (``cuts.jsonl.gz``): each manifest is a record stream."""

    format = "lhotse"
    folder_hint = "its cuts manifest (cuts.jsonl.gz), or --input-format lhotse-shar for a Shar directory"

    def count_units(self) -> list[Unit]:
        return [Unit(sum(1 for _ in manifest_lines(p)), whole=False) for p in self.files]

    def read_unit(self, u: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Any]]:
        from lhotse.serialization import deserialize_item

        path = self.files[u]
        for i, (lineno, line) in enumerate(manifest_lines(path)):
            if i >= ranges[-1][1]:
                return
            if not any(a <= i < b for a, b in ranges):
                continue
            if isinstance(line, RecordError):
                yield i, f"{path}:{lineno}", line
                continue
            source = f"{path}:{lineno}"
            try:
                cut = deserialize_item(json.loads(line))
                source = f"{path}:{lineno} (cut {cut.id})"
                view, record = cut_record(cut, self.audio_root)
            except RecordError as err:
                yield i, source, err
                continue
            except Exception as err:  # lhotse raises assorted errors on malformed entries
                yield i, source, RecordError(f"is not a Lhotse cut ({type(err).__name__}: {err})")
                continue
            yield i, source, LazyRecord(self, (view, record, f"cut {view['id']}"))

    def view(self, where) -> tuple[dict, dict, str]:
        view, record, what = where
        return view, dict(record), what


class LhotseSharCorpus(Corpus):
    """Lhotse Shar directories: each shard (cuts + recording tar) is a unit one task reads whole."""

    format = "lhotse-shar"

    def find_files(self, inputs: Sequence[str]) -> list[str]:
        self.shards = self._shards(super().find_files(inputs))
        return [p for shard in self.shards for p in shard.values()]

    @staticmethod
    def _shards(dirs: Sequence[str]) -> list[dict]:
        """``{field: path}`` per shard, in order, as ``lhotse``'s Shar reader lists them."""
        from lhotse.shar.readers.lazy import LazySharIterator

        out = []
        for d in dirs:
            if not os.path.isdir(d):
                raise CorpusError(f"--input {d} is not a directory; give Lhotse Shar directories (cuts.000000.jsonl.gz, "
                                  "recording.000000.tar, ...), or --input-format lhotse for a cuts manifest")
            try:
                shar = LazySharIterator(in_dir=d)
            except AssertionError as err:
                raise CorpusError(f"--input {d} is not a Lhotse Shar directory ({err or 'no cuts.*.jsonl.gz'}); it "
                                  "needs cuts.000000.jsonl.gz and recording.000000.tar, as CutSet.to_shar writes") from None
            if "recording" not in shar.fields:
                raise CorpusError(f"--input {d}: the Shar directory has no recording field (fields: "
                                  f"{sorted(shar.fields)}); write it with fields={{'recording': 'flac'}}")
            out.extend({k: str(v) for k, v in shard.items()} for shard in shar.shards)
        return out

    def count_units(self) -> list[Unit]:
        return [Unit(sum(1 for _ in manifest_lines(shard["cuts"])), whole=True) for shard in self.shards]

    def read_unit(self, u: int, ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, str, Any]]:
        shard = self.shards[u]
        count = self.units()[u].records
        cuts_path = shard["cuts"]
        scan = scan_tar(shard["recording"])
        pairs = [scan.members[j:j + 2] for j in range(0, len(scan.members), 2)]  # (data, its json)
        cuts = self._cuts(shard)
        for i in range(count):
            if i >= ranges[-1][1]:
                return
            item = next(cuts, None)
            wanted = any(a <= i < b for a, b in ranges)
            if not wanted:
                continue
            source = f"{cuts_path}:{i + 1}"
            if item is None or isinstance(item, RecordError):
                yield i, source, item or RecordError(f"the cut manifest {cuts_path} ends before its cut {i + 1}")
                continue
            cut = item
            source = f"{cuts_path}:{i + 1} (cut {cut.id})"
            if i >= len(pairs):
                why = f"the archive {scan.problem}" if scan.problem else "it holds fewer cuts than the manifest"
                yield i, source, RecordError(f"has no audio in {shard['recording']}: {why}", "recording")
                continue
            data = pairs[i][0]
            stem, _, ext = data.name.rpartition(".")
            if stem != cut.id:
                yield i, source, RecordError(f"{shard['recording']} member {data.name} does not belong to this cut "
                                             f"(cut {i + 1} of the shard is {cut.id}): the archive and the manifest "
                                             "are out of step", "recording")
                continue
            if ext == "nodata":
                yield i, source, RecordError("is missing: the cut was written to Shar without a recording", "recording")
                continue
            if data.offset + data.size > scan.size:
                yield i, source, RecordError(f"member {data.name} of {shard['recording']} is cut short: the archive "
                                             f"ends at byte {scan.size} (truncated; fetch it again)", "recording")
                continue
            view = cut.to_dict()
            view.pop("recording", None)  # a Shar placeholder: the audio is the member below
            transcript = " ".join(s.text.strip() for s in cut.supervisions if s.text and s.text.strip()) or None
            record = {"id": cut.id, **({"transcript": transcript} if transcript else {})}
            yield i, source, LazyRecord(self, (shard["recording"], data, view, record, f"cut {cut.id}"))

    @staticmethod
    def _cuts(shard: dict) -> Iterator[Any]:
        """The shard's cuts with their JSONL custom fields, through ``lhotse``; a failure ends
        the stream with its error (the remaining cuts are then reported as lost)."""
        from lhotse.shar.readers.lazy import LazySharIterator

        fields = {"cuts": [shard["cuts"]], **{k: [v] for k, v in shard.items()
                                                if k != "cuts" and ".jsonl" in os.path.basename(v)}}
        try:
            yield from LazySharIterator(fields=fields)
        except Exception as err:  # a damaged manifest or field file (gzip, JSON, lhotse's checks)
            yield RecordError(f"the Shar shard {shard['cuts']} cannot be read further ({type(err).__name__}: {err})")

    def view(self, where) -> tuple[dict, dict, str]:
        path, member, view, record, what = where
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), member.size, member.offset)
        if len(data) != member.size:
            raise RecordError(f"member {member.name} of {path} is cut short ({len(data)} of {member.size} bytes)",
                              "recording")
        audio = NamedBytes(data, f"{path}:{member.name}")
        return {**view, "audio": audio}, {**record, "audio": audio}, what
