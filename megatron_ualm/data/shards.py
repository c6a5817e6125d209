"""Token shards: aligned Megatron ``IndexedDataset`` streams plus a JSON sidecar.

A shard is a directory, written under a temporary name and renamed into place when complete,
so a half-written shard is never visible under its final name::

    <out>/<name>-00007/
        shard.json        sidecar: family, format version, tokenizer and codec identity, K,
                          frame rates, counts (samples, tokens, text tokens, frames, seconds)
        text.bin/.idx     stream 0: int32 text ids; one sequence per message; the sequence
                          mode (int8) encodes role, content kind and the condition flag
        codes.bin/.idx    audio out: uint16 codec codes, a message's [K, T] row-major
        audio.bin/.idx    audio in: int16 16 kHz PCM, or float32 valid log-mel frames
                          [n_mels, m] row-major (see ``megatron_ualm.data.audio``)
        rejected.jsonl    one line per skipped manifest record: source, field, reason

All streams of a shard hold the same documents (one per training record) and the same
sequences (one per message); a message puts its content in the stream of its kind and an
empty sequence in the others. Keeping Megatron's .bin/.idx layout gives mmap reads, the
document index, and compatibility with Megatron's own tooling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, MEL_HOP, MEL_PER_AUDIO_IN_FRAME, SAMPLES_PER_AUDIO_IN_FRAME
from megatron_ualm.data.errors import RecordError
from megatron_ualm.vocab import ROLES

SHARD_FORMAT = "ualm-shard"
SHARD_FORMAT_VERSION = 1
SIDECAR = "shard.json"
REJECTED = "rejected.jsonl"
FAMILIES = ("understanding", "generation", "text")
KINDS = ("text", "audio_out", "audio_in")
STREAM_OF_KIND = {"text": "text", "audio_out": "codes", "audio_in": "audio"}
STREAM_DTYPES = {"text": np.int32, "codes": np.uint16}
AUDIO_STORAGE_DTYPES = {"pcm16": np.int16, "mel": np.float32}

_CONDITION_BIT = 16


def encode_mode(role: str, kind: str, condition: bool) -> int:
    """The int8 sequence mode of a message: ``kind | role << 2 | condition << 4``."""
    return KINDS.index(kind) | ROLES.index(role) << 2 | (_CONDITION_BIT if condition else 0)


def decode_mode(mode: int) -> tuple[str, str, bool]:
    """(role, kind, condition) of a sequence mode."""
    mode = int(mode)
    return ROLES[(mode >> 2) & 3], KINDS[mode & 3], bool(mode & _CONDITION_BIT)


@dataclass
class Segment:
    """One message of a stored record.

    Attributes:
        role: system / user / assistant.
        kind: text (``data`` = ids ``[n]``), audio_out (codes ``[K, T]``) or audio_in
            (int16 PCM ``[n]`` or float32 valid mel frames ``[n_mels, m]``).
        data: the content.
        condition: the generation condition that CFG dropout may replace by an empty one.
    """

    role: str
    kind: str
    data: np.ndarray
    condition: bool = False

    def units(self) -> int:
        """Text tokens, codec frames T, or 25 Hz audio-in frames."""
        if self.kind == "text":
            return int(self.data.shape[0])
        if self.kind == "audio_out":
            return int(self.data.shape[1])
        return audio_in_frames(self.data)


def audio_in_frames(data: np.ndarray) -> int:
    """25 Hz frames of stored audio in: ``ceil(samples / 640)`` for PCM, mel frames / 4 for mel.

    Encoder windows are a whole number of 25 Hz frames, so summing per window gives the same.
    """
    if data.ndim == 1:
        return -(-int(data.shape[0]) // SAMPLES_PER_AUDIO_IN_FRAME)
    return int(data.shape[1]) // MEL_PER_AUDIO_IN_FRAME


def content_positions(kind: str, units: int, num_codebooks: int) -> int:
    """Sequence positions a message's content takes (audio out: T + K - 1 under the delay)."""
    if kind == "audio_out":
        return units + num_codebooks - 1 if units else 0
    return units


def document_length(segments: list[Segment], num_codebooks: int) -> int:
    """Positions of a record in the sequence format: bos + per message (role, modality, content, end)."""
    return 1 + sum(3 + content_positions(s.kind, s.units(), num_codebooks) for s in segments)


class ShardWriter:
    """Writes one shard under a temporary directory and renames it into place on ``commit``.

    Args:
        path: the final shard directory.
        family: understanding / generation / text.
        header: identity fields for the sidecar (tokenizer, codec, audio_in, source, run_key).
        audio_storage: ``pcm16`` or ``mel`` when the shard stores audio in, else None.
        codes: whether the shard stores audio-out codes.
    """

    def __init__(self, path: str, family: str, header: dict, audio_storage: Optional[str] = None,
                 codes: bool = False):
        if family not in FAMILIES:
            raise ValueError(f"family {family!r} is not one of {FAMILIES}")
        self.path = os.path.abspath(path)
        self.tmp = os.path.join(os.path.dirname(self.path), f".{os.path.basename(self.path)}.partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.family = family
        self.header = header
        self.streams = {"text": np.int32}
        if codes:
            self.streams["codes"] = np.uint16
        if audio_storage is not None:
            self.streams["audio"] = AUDIO_STORAGE_DTYPES[audio_storage]
        self.audio_storage = audio_storage
        self.codebook_size = (header.get("codec") or {}).get("codebook_size")
        self.num_codebooks = (header.get("codec") or {}).get("num_codebooks", 1)
        self._builders = {
            name: IndexedDatasetBuilder(os.path.join(self.tmp, f"{name}.bin"), dtype=dtype, multimodal=name == "text")
            for name, dtype in self.streams.items()
        }
        self._rejected = open(os.path.join(self.tmp, REJECTED), "w")
        self.counts = dict(samples=0, tokens=0, text_tokens=0, audio_out_frames=0, audio_in_frames=0,
                           audio_out_seconds=0.0, audio_in_seconds=0.0, rejected=0)
        self.reject_reasons: dict[str, int] = {}

    def add(self, segments: list[Segment]) -> None:
        """Appends one record (a document of messages).

        Raises:
            RecordError: a segment's content does not fit the shard (wrong stream, codes out of
                range or with the wrong K); nothing is written then.
        """
        if not segments:
            raise RecordError("the record has no messages")
        for s in segments:
            stream = STREAM_OF_KIND[s.kind]
            if stream not in self.streams:
                raise RecordError(f"a {self.family} shard has no {stream} stream for a {s.kind} message")
            if s.kind == "audio_out":
                K, card = self.num_codebooks, self.codebook_size
                if s.data.ndim != 2 or s.data.shape[0] != K or s.data.shape[1] == 0:
                    raise RecordError(f"codes must be [K={K}, T>0], got shape {list(s.data.shape)}", "codes")
                if s.data.min() < 0 or s.data.max() >= card:
                    raise RecordError(
                        f"codes must lie in [0, {card}), got range [{int(s.data.min())}, {int(s.data.max())}]", "codes")
        for s in segments:
            stream = STREAM_OF_KIND[s.kind]
            mode = encode_mode(s.role, s.kind, s.condition)
            for name, builder in self._builders.items():
                if name == stream:
                    builder.add_item(torch.from_numpy(np.ascontiguousarray(s.data).reshape(-1)), mode)
                else:
                    builder.add_item(torch.empty(0, dtype=torch.int32), mode)
            units = s.units()
            if s.kind == "text":
                self.counts["text_tokens"] += units
            elif s.kind == "audio_out":
                self.counts["audio_out_frames"] += units
                self.counts["audio_out_seconds"] += units / self.header["codec"]["frame_rate"]
            else:
                self.counts["audio_in_frames"] += units
                samples = s.data.shape[0] * 1.0 if s.data.ndim == 1 else s.data.shape[1] * MEL_HOP
                self.counts["audio_in_seconds"] += samples / AUDIO_IN_SAMPLE_RATE
        for builder in self._builders.values():
            builder.end_document()
        self.counts["samples"] += 1
        self.counts["tokens"] += document_length(segments, self.num_codebooks)

    def reject(self, err: RecordError) -> None:
        """Counts a skipped record and writes its reason."""
        self.counts["rejected"] += 1
        self._rejected.write(json.dumps(err.to_json()) + "\n")
        # Group reasons without their specifics (paths, numbers) so the summary stays short.
        general = re.sub(r"-?\d+(\.\d+)?", "#", re.sub(r"\S*/\S*", "<path>", err.reason.split(":")[0]))
        key = f"{err.field or 'record'}: {general[:80]}"
        self.reject_reasons[key] = self.reject_reasons.get(key, 0) + 1

    def commit(self) -> dict:
        """Finalises the index files and sidecar, then renames the shard into place.

        Returns:
            The sidecar.
        """
        for name, builder in self._builders.items():
            builder.finalize(os.path.join(self.tmp, f"{name}.idx"))
        self._rejected.close()
        sidecar = {
            "format": SHARD_FORMAT,
            "version": SHARD_FORMAT_VERSION,
            "family": self.family,
            "streams": {name: np.dtype(dtype).name for name, dtype in self.streams.items()},
            "audio_in_storage": self.audio_storage,
            **self.header,
            "counts": {k: round(v, 3) if isinstance(v, float) else v for k, v in self.counts.items()},
            "reject_reasons": self.reject_reasons,
        }
        with open(os.path.join(self.tmp, SIDECAR), "w") as f:
            json.dump(sidecar, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.rename(self.tmp, self.path)
        return sidecar

    def abort(self) -> None:
        """Removes the temporary directory."""
        for builder in self._builders.values():
            builder.data_file.close()
        self._rejected.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def read_sidecar(path: str) -> dict:
    """Loads and checks a shard's sidecar.

    Raises:
        ValueError: no sidecar, or a format / version this code cannot read.
    """
    file = os.path.join(path, SIDECAR)
    if not os.path.isfile(file):
        raise ValueError(f"{path} is not a complete UALM shard: {file} is missing")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_FORMAT_VERSION:
        raise ValueError(
            f"{file}: format {meta.get('format')!r} version {meta.get('version')!r}; this code reads "
            f"{SHARD_FORMAT!r} version {SHARD_FORMAT_VERSION}"
        )
    return meta


class ShardReader:
    """Reads the records of one shard (mmap; picklable for data-loader workers).

    Args:
        path: the shard directory.
    """

    def __init__(self, path: str):
        self.path = path
        self.meta = read_sidecar(path)
        self.streams = {
            name: IndexedDataset(os.path.join(path, name), multimodal=name == "text")
            for name in self.meta["streams"]
        }
        text = self.streams["text"]
        for name, ds in self.streams.items():
            if len(ds) != len(text) or not np.array_equal(ds.document_indices, text.document_indices):
                raise ValueError(f"{path}: stream {name} is not aligned with the text stream")
        self.document_indices = text.document_indices
        self.modes = text.index.sequence_modes
        codec = self.meta.get("codec") or {}
        self.num_codebooks = int(codec.get("num_codebooks", 1))
        self.n_mels = (self.meta.get("audio_in") or {}).get("n_mels")

    def __len__(self) -> int:
        return len(self.document_indices) - 1

    def document(self, d: int) -> list[Segment]:
        """The messages of record ``d``.

        The arrays are copies: ``IndexedDataset`` closes its mmap when collected, and a view
        that outlived the reader would read unmapped memory.
        """
        s0, s1 = int(self.document_indices[d]), int(self.document_indices[d + 1])
        parts = {name: ds[s0:s1] for name, ds in self.streams.items()}
        texts, modes = parts["text"]
        segments = []
        for j in range(s1 - s0):
            role, kind, condition = decode_mode(modes[j])
            if kind == "text":
                data = texts[j]
            elif kind == "audio_out":
                data = parts["codes"][j].reshape(self.num_codebooks, -1)
            else:
                data = parts["audio"][j]
                if self.meta["audio_in_storage"] == "mel":
                    data = data.reshape(self.n_mels, -1)
            segments.append(Segment(role, kind, np.array(data), condition))
        return segments

    def document_lengths(self) -> np.ndarray:
        """Positions of every record in the sequence format, from the index alone: int64 ``[n]``."""
        kinds = self.modes.astype(np.int64) & 3
        units = self.streams["text"].sequence_lengths.astype(np.int64).copy()
        if "codes" in self.streams:
            frames = self.streams["codes"].sequence_lengths.astype(np.int64) // self.num_codebooks
            units = np.where(kinds == 1, frames + np.where(frames > 0, self.num_codebooks - 1, 0), units)
        if "audio" in self.streams:
            n = self.streams["audio"].sequence_lengths.astype(np.int64)
            if self.meta["audio_in_storage"] == "mel":
                frames = n // self.n_mels // MEL_PER_AUDIO_IN_FRAME
            else:
                frames = -(-n // SAMPLES_PER_AUDIO_IN_FRAME)
            units = np.where(kinds == 2, frames, units)
        per_sequence = units + 3
        starts = self.document_indices[:-1]
        return np.add.reduceat(per_sequence, starts) + 1 if len(starts) else np.zeros(0, np.int64)
