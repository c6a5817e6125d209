"""Token shards: aligned Megatron ``IndexedDataset`` streams plus a JSON sidecar.

A shard is a directory, written under a temporary name and renamed into place when complete,
so a half-written shard is never visible under its final name::

    <out>/<name>-00007/
        shard.json        sidecar: family, format version, tokenizer and codec identity (with
                          absolute paths), K, frame rates, the token-id layout (``vocab``,
                          ``vocab_fingerprint``), counts (samples, tokens, text tokens,
                          frames, seconds)
        text.bin/.idx     stream 0: int32 text ids; one sequence per message; the sequence
                          mode (int8) encodes role, content kind, the condition flag and the loss flag
        codes.bin/.idx    audio out: uint16 codec codes, a message's [K, T] row-major
        audio.bin/.idx    audio in: int16 16 kHz PCM, or float32 valid log-mel frames
                          [n_mels, m] row-major (see ``megatron_ualm.data.audio``)
        rejected.jsonl    one line per skipped manifest record: source, field, reason

All streams of a shard hold the same documents (one per training record) and the same
sequences (one per message); a message puts its content in the stream of its kind and an
empty sequence in the others. Keeping Megatron's .bin/.idx layout gives mmap reads, the
document index, and compatibility with Megatron's own tooling.

Readers check a shard before using it (``check_shard``, from the sidecar and the ``.idx``
files alone): each ``.bin`` has exactly the bytes its index describes, the streams are
aligned, and the sidecar's counts are the index's. A shard that fails raises ``ShardError``
naming the shard and the file.
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
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, _IndexReader

from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, MEL_HOP, MEL_PER_AUDIO_IN_FRAME, SAMPLES_PER_AUDIO_IN_FRAME
from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.families import FAMILIES
from megatron_ualm.files import partial_dir
from megatron_ualm.vocab import ROLES, layout_fingerprint, vocab_layout

SHARD_FORMAT = "ualm-shard"
SHARD_FORMAT_VERSION = 1
SIDECAR = "shard.json"
REJECTED = "rejected.jsonl"
KINDS = ("text", "audio_out", "audio_in")
STREAM_OF_KIND = {"text": "text", "audio_out": "codes", "audio_in": "audio"}
KIND_OF_STREAM = {stream: KINDS.index(kind) for kind, stream in STREAM_OF_KIND.items()}
STREAM_DTYPES = {"text": np.int32, "codes": np.uint16}
AUDIO_STORAGE_DTYPES = {"pcm16": np.int16, "mel": np.float32}

_CONDITION_BIT = 16
_LOSS_FLIP_BIT = 32
COUNTED = ("samples", "tokens", "text_tokens", "audio_out_frames", "audio_in_frames")
"""Sidecar counts that the index determines (checked against it)."""


class ShardError(ValueError):
    """A shard that cannot be used as written: a missing or damaged file, or a sidecar that
    disagrees with its data.

    Args:
        message: one line naming the shard and the file at fault.
        problems: every problem found, each naming its file (default: ``[message]``).
    """

    def __init__(self, message: str, problems: Optional[list] = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]

    @classmethod
    def damaged(cls, path: str, problems: list) -> "ShardError":
        """The error for a shard with ``problems`` (the first three are shown)."""
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        return cls(f"damaged shard {path}: {shown}. Delete the shard and rerun its preprocessing command to "
                   "rewrite it (tools/inspect_shards.py lists every problem)", problems)


def encode_mode(role: str, kind: str, condition: bool, loss: Optional[bool] = None) -> int:
    """The int8 sequence mode of a message: ``kind | role << 2 | condition << 4 | loss_flip << 5``.

    ``loss_flip`` is set when ``loss`` (train on the message; None: the role's default)
    differs from the default, assistant messages trained and others not, so shards written
    before the bit existed read with the default.
    """
    flip = loss is not None and bool(loss) != (role == "assistant")
    return (KINDS.index(kind) | ROLES.index(role) << 2 | (_CONDITION_BIT if condition else 0)
            | (_LOSS_FLIP_BIT if flip else 0))


def decode_mode(mode: int) -> tuple[str, str, bool]:
    """(role, kind, condition) of a sequence mode."""
    mode = int(mode)
    return ROLES[(mode >> 2) & 3], KINDS[mode & 3], bool(mode & _CONDITION_BIT)


def mode_loss(mode: int) -> bool:
    """Whether the message of a sequence mode is trained (its role's default unless flipped)."""
    return (ROLES[(int(mode) >> 2) & 3] == "assistant") != bool(int(mode) & _LOSS_FLIP_BIT)


@dataclass
class Segment:
    """One message of a stored record.

    Attributes:
        role: system / user / assistant.
        kind: text (``data`` = ids ``[n]``), audio_out (codes ``[K, T]``) or audio_in
            (int16 PCM ``[n]`` or float32 valid mel frames ``[n_mels, m]``).
        data: the content.
        condition: the generation condition that CFG dropout may replace by an empty one.
        loss: train on the message; None means the role's default (assistant only).
    """

    role: str
    kind: str
    data: np.ndarray
    condition: bool = False
    loss: Optional[bool] = None

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
        self.tmp = partial_dir(self.path)
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.family = family
        self.header = absolute_paths(header)
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
            mode = encode_mode(s.role, s.kind, s.condition, s.loss)
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
        codec = self.header.get("codec") or {}
        layout = vocab_layout(self.header.get("tokenizer"), None, codec.get("num_codebooks"), codec.get("codebook_size"))
        sidecar = {
            "format": SHARD_FORMAT,
            "version": SHARD_FORMAT_VERSION,
            "family": self.family,
            "streams": {name: np.dtype(dtype).name for name, dtype in self.streams.items()},
            "audio_in_storage": self.audio_storage,
            **self.header,
            "vocab": layout,
            "vocab_fingerprint": layout_fingerprint(layout),
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


RECORDED_PATHS = ("tokenizer", "codec")
"""Sidecar entries whose ``path`` names a file or directory the shard was made with."""


def absolute_paths(header: dict) -> dict:
    """``header`` with its recorded paths made absolute (those that exist from here)."""
    out = dict(header)
    for key in RECORDED_PATHS:
        entry = out.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"] \
                and not os.path.isabs(entry["path"]) and os.path.exists(entry["path"]):
            out[key] = {**entry, "path": os.path.abspath(entry["path"])}
    return out


def resolve_recorded_path(shard: str, recorded: Optional[str]) -> Optional[str]:
    """Where a path recorded in a shard's sidecar (tokenizer, codec) is now, whatever the cwd.

    Sidecars record absolute paths. Older ones recorded the path as typed, relative to the
    directory preprocessing ran in, which was not recorded: usually the shard's output
    directory or one of its parents (the project root). Such a path is looked up against the
    shard directory and each parent in turn, then against the working directory; the first
    that exists wins. A path found nowhere comes back as recorded.
    """
    if not recorded or os.path.isabs(recorded):
        return recorded
    here = os.path.abspath(shard)
    while True:
        candidate = os.path.join(here, recorded)
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    return os.path.abspath(recorded) if os.path.exists(recorded) else recorded


def read_sidecar(path: str) -> dict:
    """Loads and checks a shard's sidecar; recorded paths come back resolved (``resolve_recorded_path``).

    Raises:
        ShardError: no sidecar, not JSON, or a format / version this code cannot read.
    """
    file = os.path.join(path, SIDECAR)
    if not os.path.isfile(file):
        raise ShardError(f"{path} is not a complete UALM shard: {file} is missing")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_FORMAT_VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise ShardError(f"{file}: format {found[0]!r} version {found[1]!r}; this code reads "
                         f"{SHARD_FORMAT!r} version {SHARD_FORMAT_VERSION}")
    for key in RECORDED_PATHS:
        entry = meta.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            entry["path"] = resolve_recorded_path(path, entry["path"])
    return meta


def shard_layout(meta: dict) -> dict:
    """A shard's token-id layout: its sidecar's ``vocab``, or for a shard written before sidecars
    carried one, the layout its tokenizer and codec fields imply."""
    if meta.get("vocab"):
        return meta["vocab"]
    codec = meta.get("codec") or {}
    return vocab_layout(meta.get("tokenizer"), None, codec.get("num_codebooks"), codec.get("codebook_size"))


def sequence_units(kinds: np.ndarray, lengths: dict, num_codebooks: int, audio_storage: Optional[str],
                   n_mels: Optional[int]) -> np.ndarray:
    """Text tokens / codec frames / 25 Hz audio-in frames of every message, from stream lengths.

    Args:
        kinds: int64 ``[n]`` message kinds (index into ``KINDS``).
        lengths: int64 ``[n]`` element counts per stream name.
        num_codebooks: K.
        audio_storage: ``pcm16`` or ``mel`` when there is an audio stream.
        n_mels: mel bins of ``mel`` storage.
    """
    units = lengths["text"].copy()
    if "codes" in lengths:
        units = np.where(kinds == 1, lengths["codes"] // num_codebooks, units)
    if "audio" in lengths:
        n = lengths["audio"]
        frames = n // n_mels // MEL_PER_AUDIO_IN_FRAME if audio_storage == "mel" else -(-n // SAMPLES_PER_AUDIO_IN_FRAME)
        units = np.where(kinds == 2, frames, units)
    return units


def sequence_format_lengths(kinds: np.ndarray, units: np.ndarray, document_indices: np.ndarray,
                            num_codebooks: int) -> np.ndarray:
    """Positions of every record in the sequence format (``document_length``), vectorised: int64 ``[d]``."""
    content = np.where((kinds == 1) & (units > 0), units + num_codebooks - 1, units)
    starts = document_indices[:-1]
    return np.add.reduceat(content + 3, starts) + 1 if len(starts) else np.zeros(0, np.int64)


def _first(mask: np.ndarray) -> int:
    return int(np.nonzero(mask)[0][0])


def _open_index(path: str, name: str, dtype: np.dtype, problems: list) -> Optional[_IndexReader]:
    """A stream's index checked against its .bin (dtype, contiguous pointers, exact size, document index)."""
    idx, bin_ = os.path.join(path, f"{name}.idx"), os.path.join(path, f"{name}.bin")
    missing = [f for f in (idx, bin_) if not os.path.isfile(f)]
    if missing:
        problems.extend(f"{f} is missing" for f in missing)
        return None
    try:
        index = _IndexReader(idx, multimodal=name == "text")
    except Exception as err:  # a truncated or foreign .idx fails in numpy or Megatron's header check
        problems.append(f"{idx}: unreadable index ({type(err).__name__}: {err})")
        return None
    found = len(problems)
    if np.dtype(index.dtype) != dtype:
        problems.append(f"{idx}: holds {np.dtype(index.dtype).name}, the sidecar says {dtype.name}")
    lengths = index.sequence_lengths.astype(np.int64)
    expected = np.concatenate([[0], np.cumsum(lengths * dtype.itemsize)[:-1]]) if len(lengths) else lengths
    if not np.array_equal(index.sequence_pointers, expected):
        bad = _first(index.sequence_pointers != expected)
        problems.append(f"{idx}: sequence {bad} starts at byte {int(index.sequence_pointers[bad])}, "
                        f"expected {int(expected[bad])}")
    size, described = os.path.getsize(bin_), int(lengths.sum()) * dtype.itemsize
    if size != described:
        problems.append(f"{bin_}: {size} bytes, the index describes {described}")
    docs = index.document_indices
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or np.any(np.diff(docs) <= 0):
        problems.append(f"{idx}: document index is not increasing from 0 to {len(lengths)}")
    return index if len(problems) == found else None


def shard_problems(path: str, meta: dict) -> list[str]:
    """Every problem ``check_shard`` finds (empty when the shard is usable); each names its file."""
    sidecar = os.path.join(path, SIDECAR)
    streams = meta.get("streams")
    if not isinstance(streams, dict) or "text" not in streams:
        return [f"{sidecar}: 'streams' must list the text stream, got {streams!r}"]
    problems: list[str] = []
    indexes = {}
    for name, dtype in streams.items():
        index = _open_index(path, name, np.dtype(dtype), problems)
        if index is not None:
            indexes[name] = index
    if problems:
        return problems
    text = indexes["text"]
    for name, index in indexes.items():
        if len(index) != len(text) or not np.array_equal(index.document_indices, text.document_indices):
            problems.append(f"{path}: stream {name} is not aligned with the text stream")
    if problems:
        return problems
    docs = text.document_indices
    modes = text.sequence_modes.astype(np.int64)
    bad = (modes < 0) | ((modes & 3) >= len(KINDS)) | (((modes >> 2) & 3) >= len(ROLES))
    if bad.any():
        j = _first(bad)
        return [f"{path}/text.idx: message {j} (record {int(np.searchsorted(docs, j, 'right')) - 1}) has an "
                f"invalid mode {int(modes[j])}"]
    kinds = modes & 3
    lengths = {name: index.sequence_lengths.astype(np.int64) for name, index in indexes.items()}

    def where(j: int) -> str:
        d = int(np.searchsorted(docs, j, "right")) - 1
        return f"{path}: record {d} message {j - int(docs[d])} ({KINDS[int(kinds[j])]})"

    for name, n in lengths.items():
        stray = (n > 0) & (kinds != KIND_OF_STREAM[name])
        if stray.any():
            problems.append(f"{where(_first(stray))} has data in stream {name} ({int(stray.sum())} such messages)")
    for kind, name, what in ((1, "codes", "no codec frames"), (2, "audio", "no audio")):
        if name in lengths:
            empty = (kinds == kind) & (lengths[name] == 0)
            if empty.any():
                problems.append(f"{where(_first(empty))}: {what}")
    codec, audio_in = meta.get("codec") or {}, meta.get("audio_in") or {}
    num_codebooks = int(codec.get("num_codebooks", 1))
    storage, n_mels = meta.get("audio_in_storage"), audio_in.get("n_mels")
    if "codes" in lengths and (lengths["codes"] % num_codebooks).any():
        problems.append(f"{where(_first(lengths['codes'] % num_codebooks > 0))}: codes are not a whole number "
                        f"of K={num_codebooks} rows")
    if "audio" in lengths and storage == "mel":
        if not n_mels:
            return problems + [f"{sidecar}: audio_in.n_mels is missing for mel storage"]
        if (lengths["audio"] % n_mels).any():
            problems.append(f"{where(_first(lengths['audio'] % n_mels > 0))}: mel features are not a whole "
                            f"number of n_mels={n_mels} rows")
    units = sequence_units(kinds, lengths, num_codebooks, storage, n_mels)
    held = {"samples": len(docs) - 1,
            "tokens": int(sequence_format_lengths(kinds, units, docs, num_codebooks).sum()),
            "text_tokens": int(units[kinds == 0].sum()),
            "audio_out_frames": int(units[kinds == 1].sum()),
            "audio_in_frames": int(units[kinds == 2].sum())}
    counts = meta.get("counts") or {}
    for key in COUNTED:
        if counts.get(key) != held[key]:
            problems.append(f"{sidecar}: counts.{key} = {counts.get(key)}, the index holds {held[key]}")
    return problems


def check_shard(path: str, meta: Optional[dict] = None) -> dict:
    """Checks a shard from its sidecar and ``.idx`` files, without reading the data.

    Each stream's ``.bin`` has exactly the bytes its ``.idx`` describes, with contiguous
    pointers and the sidecar's dtype; the streams hold the same records and messages; message
    modes are valid and each message's content is in its own stream (codes a whole number of
    K rows, mel features of n_mels rows); and the sidecar's counts (samples, tokens, text
    tokens, codec and audio-in frames) are the index's. Value ranges need the data:
    ``megatron_ualm.data.inspect.validate_shard`` adds those.

    Args:
        path: the shard directory.
        meta: its sidecar, if already read.

    Returns:
        The sidecar.

    Raises:
        ShardError: listing every problem, each naming its file.
    """
    meta = read_sidecar(path) if meta is None else meta
    problems = shard_problems(path, meta)
    if problems:
        raise ShardError.damaged(path, problems)
    return meta


class ShardReader:
    """Reads the records of one shard (mmap; picklable for data-loader workers).

    Args:
        path: the shard directory.
    """

    def __init__(self, path: str):
        self.path = path
        self.meta = check_shard(path)
        # mmap cannot map an empty file: a shard whose every record was rejected reads by file.
        self.streams = {
            name: IndexedDataset(os.path.join(path, name), multimodal=name == "text",
                                 mmap=os.path.getsize(os.path.join(path, f"{name}.bin")) > 0)
            for name in self.meta["streams"]
        }
        text = self.streams["text"]
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
        try:
            parts = {name: ds[s0:s1] for name, ds in self.streams.items()}
        except (ValueError, IndexError) as err:  # a file that changed on disk after the check
            raise ShardError(f"{self.path}: record {d} cannot be read ({err}); the shard changed after it was "
                             "opened") from None
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
            segments.append(Segment(role, kind, np.array(data), condition, mode_loss(modes[j])))
        return segments

    def document_lengths(self) -> np.ndarray:
        """Positions of every record in the sequence format, from the index alone: int64 ``[n]``."""
        kinds = self.modes.astype(np.int64) & 3
        lengths = {name: ds.sequence_lengths.astype(np.int64) for name, ds in self.streams.items()}
        units = sequence_units(kinds, lengths, self.num_codebooks, self.meta.get("audio_in_storage"), self.n_mels)
        return sequence_format_lengths(kinds, units, self.document_indices, self.num_codebooks)
