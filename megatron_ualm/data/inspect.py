"""Readable records, statistics and validation of UALM shards (``tools/inspect_shards.py``)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, MEL_HOP
from megatron_ualm.data.shards import KINDS, Segment, ShardError, ShardReader
from megatron_ualm.data.tokenizer import TextTokenizer


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


def validate_shard(path: str) -> list[str]:
    """Every problem found in a shard (empty when valid).

    ``check_shard``'s checks (files, index against data, stream alignment, message modes and
    stream use, sidecar counts; the same that ``build_blend`` and training run), then a scan of
    the data for value ranges: text ids below the tokenizer's vocabulary, codes below the
    codebook size.
    """
    try:
        reader = ShardReader(path)
    except ShardError as err:
        return err.problems
    problems = []
    vocab_size = reader.meta["tokenizer"]["vocab_size"]
    card = (reader.meta.get("codec") or {}).get("codebook_size", 0)
    for d in range(len(reader)):
        for m, s in enumerate(reader.document(d)):
            where = f"{path}: record {d} message {m} ({s.kind})"
            if s.kind == "text" and s.data.size and (s.data.min() < 0 or s.data.max() >= vocab_size):
                problems.append(f"{where}: text ids outside [0, {vocab_size})")
            elif s.kind == "audio_out" and s.data.size and s.data.max() >= card:
                problems.append(f"{where}: codes outside [0, {card})")
        if len(problems) > 20:
            return problems + ["... (stopped after 20 problems)"]
    return problems
