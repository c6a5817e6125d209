"""Readable records, statistics and validation of UALM shards (``tools/inspect_shards.py``)."""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, MEL_HOP
from megatron_ualm.data.shards import (KINDS, SIDECAR, STREAM_OF_KIND, Segment, ShardReader, decode_mode,
                                       read_sidecar)
from megatron_ualm.data.tokenizer import TextTokenizer
from megatron_ualm.vocab import ROLES


def describe_segment(s: Segment, tokenizer: Optional[TextTokenizer], frame_rate: Optional[float]) -> str:
    """``<audio-in 12.0 s>``, ``<audio-out 250 frames x 8>`` or the (decoded) text."""
    flag = " (condition)" if s.condition else ""
    if s.kind == "text":
        body = repr(tokenizer.decode(s.data)) if tokenizer is not None else f"ids {s.data.tolist()}"
        return f"[{s.role}]{flag} {body}"
    if s.kind == "audio_out":
        secs = f", {s.data.shape[1] / frame_rate:.2f} s" if frame_rate else ""
        return f"[{s.role}]{flag} <audio-out {s.data.shape[1]} frames x {s.data.shape[0]}{secs}>"
    seconds = s.data.shape[0] / AUDIO_IN_SAMPLE_RATE if s.data.ndim == 1 else s.data.shape[1] * MEL_HOP / AUDIO_IN_SAMPLE_RATE
    return f"[{s.role}]{flag} <audio-in {seconds:.1f} s, {s.units()} frames>"


def describe_record(segments: list[Segment], tokenizer: Optional[TextTokenizer] = None,
                    frame_rate: Optional[float] = 50.0) -> str:
    """One line per message of a record."""
    return "\n".join(describe_segment(s, tokenizer, frame_rate) for s in segments)


def shard_stats(reader: ShardReader) -> dict:
    """Family, records, tokens, messages per kind, length percentiles, and the sidecar counts."""
    lengths = reader.document_lengths()
    kinds = reader.modes.astype(np.int64) & 3
    return {
        "family": reader.meta["family"],
        "records": len(reader),
        "tokens": int(lengths.sum()),
        "messages": {k: int((kinds == i).sum()) for i, k in enumerate(KINDS)},
        "record_length_p50_p99_max": [int(np.percentile(lengths, 50)), int(np.percentile(lengths, 99)), int(lengths.max())]
        if len(lengths) else [0, 0, 0],
        "sidecar_counts": reader.meta["counts"],
    }


def _check_index(path: str, name: str, itemsize: int) -> list[str]:
    """Offsets of an .idx against its .bin: contiguous pointers and the exact file size."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    idx, bin_ = os.path.join(path, f"{name}.idx"), os.path.join(path, f"{name}.bin")
    for f in (idx, bin_):
        if not os.path.isfile(f):
            return [f"{f} is missing"]
    try:
        index = _IndexReader(idx, multimodal=name == "text")
    except Exception as err:  # a truncated or foreign .idx fails in numpy or the header check
        return [f"{idx}: unreadable index ({err})"]
    problems = []
    lengths = index.sequence_lengths.astype(np.int64)
    pointers = index.sequence_pointers
    expected = np.concatenate([[0], np.cumsum(lengths * itemsize)[:-1]]) if len(lengths) else lengths
    if not np.array_equal(pointers, expected):
        bad = int(np.nonzero(pointers != expected)[0][0])
        problems.append(f"{idx}: sequence {bad} starts at byte {int(pointers[bad])}, expected {int(expected[bad])}")
    size = os.path.getsize(bin_)
    if size != int(lengths.sum()) * itemsize:
        problems.append(f"{bin_}: {size} bytes, the index describes {int(lengths.sum()) * itemsize}")
    docs = index.document_indices
    if len(docs) == 0 or docs[0] != 0 or docs[-1] != len(lengths) or np.any(np.diff(docs) <= 0):
        problems.append(f"{idx}: document index is not increasing from 0 to {len(lengths)}")
    return problems


def validate_shard(path: str) -> list[str]:
    """Every problem found in a shard (empty when valid).

    Checks the sidecar, each stream's index against its data file, stream alignment, message
    modes and stream use, value ranges (text ids < tokenizer vocab, codes < codebook size,
    codes a whole number of K-row frames, mel a whole number of n_mels rows), and that the
    sidecar's counts match the data.
    """
    try:
        meta = read_sidecar(path)
    except (ValueError, json.JSONDecodeError) as err:
        return [str(err)]
    problems = []
    for name, dtype in meta["streams"].items():
        problems += _check_index(path, name, np.dtype(dtype).itemsize)
    if problems:
        return problems
    try:
        reader = ShardReader(path)
    except ValueError as err:
        return [str(err)]
    vocab_size = meta["tokenizer"]["vocab_size"]
    codec = meta.get("codec") or {}
    counts = dict(samples=len(reader), text_tokens=0, audio_out_frames=0, audio_in_frames=0)
    sidecar = os.path.join(path, SIDECAR)
    for d in range(len(reader)):
        s0 = int(reader.document_indices[d])
        for j in range(s0, int(reader.document_indices[d + 1])):
            mode = int(reader.modes[j])
            if (mode & 3) >= len(KINDS) or ((mode >> 2) & 3) >= len(ROLES):
                problems.append(f"{path}: record {d} message {j - s0}: invalid mode {mode}")
                continue
            _, kind, _ = decode_mode(mode)
            for name, ds in reader.streams.items():
                if name != STREAM_OF_KIND[kind] and ds.sequence_lengths[j]:
                    problems.append(f"{path}: record {d} message {j - s0} ({kind}) has data in stream {name}")
        try:
            segments = reader.document(d)
        except ValueError as err:
            problems.append(f"{path}: record {d}: {err}")
            continue
        for m, s in enumerate(segments):
            where = f"{path}: record {d} message {m} ({s.kind})"
            if s.kind == "text":
                if s.data.size and (s.data.min() < 0 or s.data.max() >= vocab_size):
                    problems.append(f"{where}: text ids outside [0, {vocab_size})")
                counts["text_tokens"] += s.units()
            elif s.kind == "audio_out":
                if s.data.size and s.data.max() >= codec.get("codebook_size", 0):
                    problems.append(f"{where}: codes outside [0, {codec.get('codebook_size')})")
                if s.data.shape[1] == 0:
                    problems.append(f"{where}: no codec frames")
                counts["audio_out_frames"] += s.units()
            else:
                if s.units() == 0:
                    problems.append(f"{where}: no audio")
                counts["audio_in_frames"] += s.units()
        if len(problems) > 20:
            problems.append("... (stopped after 20 problems)")
            return problems
    if "codes" in reader.streams:
        bad = np.nonzero(reader.streams["codes"].sequence_lengths % reader.num_codebooks)[0]
        if len(bad):
            problems.append(f"{path}: codes sequence {int(bad[0])} is not a whole number of K={reader.num_codebooks} rows")
    if meta.get("audio_in_storage") == "mel":
        bad = np.nonzero(reader.streams["audio"].sequence_lengths % reader.n_mels)[0]
        if len(bad):
            problems.append(f"{path}: mel sequence {int(bad[0])} is not a whole number of n_mels={reader.n_mels} rows")
    for key, value in counts.items():
        if meta["counts"].get(key) != value:
            problems.append(f"{sidecar}: counts.{key} = {meta['counts'].get(key)}, the data holds {value}")
    if meta["counts"].get("tokens") != int(reader.document_lengths().sum()):
        problems.append(f"{sidecar}: counts.tokens = {meta['counts'].get('tokens')}, the data holds "
                        f"{int(reader.document_lengths().sum())}")
    return problems
