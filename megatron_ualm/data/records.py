"""Manifest records -> stored messages (``Segment`` lists), one converter per data family.

Record layouts (JSONL lines or Parquet rows):

- text: ``{"text": str}`` (one trained assistant text message), or a chat:
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (``{"conversations": [{"from": "human"|"gpt", "value": str}, ...]}`` is accepted too).
- generation: ``{"audio": path | bytes | {"bytes"|"path": ...}, "start": s, "end": s,
  "caption": str, "rich_caption": {"keywords": str | [str], "layout": str, "description": str}}``;
  ``"codes": [[...] * K]`` (precomputed codec codes) may replace ``audio``. Stored as
  ``user: text caption (the CFG condition)`` -> ``assistant: audio out``; with
  ``--rich-caption plan`` the rich caption becomes an assistant text plan before the audio
  (UALM-Reason enrichment), with ``condition`` it replaces the caption as the condition.
- understanding (Audio Flamingo 3 style): ``{"audio"|"sound": ..., "start", "end",
  "conversations": [{"from": "human", "value": "<sound>\\nWhat is this?"}, {"from": "gpt", ...}]}``
  (or ``messages``). Audio placement rule: the clip goes where the ``<sound>`` marker is (one
  marker at most); a conversation without a marker gets the clip at the start of its first
  user turn (after any system turn), before the question it is about. Such records are kept,
  not rejected: a one-clip conversation has that one natural place for the clip, and
  manifests that leave the marker out would otherwise lose every record. Text around the
  marker becomes separate same-role messages.

Every problem raises ``RecordError`` naming the field; the runner adds the manifest line.
Audio: a file without samples is "empty audio" (the audio field); ``start`` / ``end`` past
the clip's end are errors on that field that give the clip's length (``end`` may overrun by
10 ms of timestamp rounding; it is never cut silently).
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Any, Optional, Sequence

import numpy as np

from megatron_ualm.data.codec import encode_audio_out, load_codec
from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, AudioInConfig, LogMel, load_audio, pcm_to_float
from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.shards import Segment
from megatron_ualm.data.tokenizer import TextTokenizer

SOUND_MARKER = "<sound>"
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "model": "assistant"}

Converted = tuple[str, "list[Segment] | RecordError"]


def parse_record(raw: Any) -> dict:
    """A record as a dict: JSONL lines arrive as text, Parquet rows as dicts."""
    if isinstance(raw, dict):
        return raw
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise RecordError(f"not valid JSON: {err}") from None
    if not isinstance(rec, dict):
        raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
    return rec


def _missing(rec: dict, field: str, what: str = "is missing") -> RecordError:
    """``field`` is missing: the error names the fields ``rec`` does have (another corpus's names),
    after a colon (the rejection summary groups reasons by what comes before it)."""
    names = [k for k, v in rec.items() if v is not None]
    have = ", ".join(map(str, names[:20])) + (", ..." if len(names) > 20 else "") if names else "no fields"
    return RecordError(f"{what}: the record has {have}", field)


def check_text(value: Any, field: str) -> str:
    """``value`` if it is a non-blank string; otherwise a ``RecordError`` naming ``field``."""
    if not isinstance(value, str):
        raise RecordError(f"must be a string, got {type(value).__name__ if value is not None else 'nothing'}", field)
    if not value.strip():
        raise RecordError("is empty text", field)
    return value


def _string(rec: dict, key: str, field: Optional[str] = None, required: bool = True) -> Optional[str]:
    field = field or key
    value = rec.get(key)
    if value is None:
        if required:
            raise _missing(rec, field)
        return None
    return check_text(value, field)


def parse_turns(rec: dict) -> list[tuple[str, str, str]]:
    """(role, content, field) of each turn of ``messages`` or ``conversations``."""
    if "messages" in rec:
        key, role_key, content_key = "messages", "role", "content"
    elif "conversations" in rec:
        key, role_key, content_key = "conversations", "from", "value"
    else:
        raise _missing(rec, "messages", "needs 'messages' (role/content) or 'conversations' (from/value)")
    turns = rec[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"must be a non-empty list of turns, got {type(turns).__name__}", key)
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(f"must be an object, got {type(turn).__name__}", where)
        role = turn.get(role_key)
        if role not in ROLE_ALIASES:
            raise RecordError(f"{role_key}={role!r}; expected one of {sorted(ROLE_ALIASES)}", f"{where}.{role_key}")
        out.append((ROLE_ALIASES[role], _string(turn, content_key, f"{where}.{content_key}"), f"{where}.{content_key}"))
    return out


def audio_source(rec: dict, keys: Sequence[str], root: str) -> tuple[Any, str]:
    """The clip's path (resolved against ``root``) or bytes, and the field it came from."""
    for key in keys:
        if key in rec and rec[key] is not None:
            value = rec[key]
            if isinstance(value, dict):  # Hugging Face datasets' Audio feature
                value = value.get("bytes") or value.get("path")
            if isinstance(value, str):
                if not value:
                    raise RecordError("is an empty path", key)
                return (value if os.path.isabs(value) else os.path.join(root, value)), key
            if isinstance(value, (bytes, bytearray)):
                return (value if isinstance(value, bytes) else bytes(value)), key  # keeps a NamedBytes' name
            raise RecordError(f"must be a file path or audio bytes, got {type(value).__name__}", key)
    raise _missing(rec, keys[0])


class Converter(ABC):
    """Turns a batch of manifest records into stored messages.

    Subclasses set ``family``, ``codes`` (stores audio-out codes) and ``audio_storage``.
    """

    family: str
    codes = False
    audio_storage: Optional[str] = None

    def __init__(self, tokenizer: str, audio_root: str = ".", audio_decoder: str = "soundfile"):
        self.tokenizer = TextTokenizer(tokenizer)
        self.audio_root = audio_root
        self.audio_decoder = audio_decoder

    def header(self) -> dict:
        """Identity fields for the shard sidecar."""
        return {"tokenizer": self.tokenizer.identity(), "codec": None, "audio_in": None}

    def text(self, role: str, content: str, field: str, condition: bool = False) -> Segment:
        ids = self.tokenizer.encode(content)
        if not ids:
            raise RecordError("tokenises to no tokens", field)
        return Segment(role, "text", np.asarray(ids, dtype=np.int32), condition)

    @abstractmethod
    def convert(self, rec: dict) -> list[Segment]:
        """Messages of one parsed record."""

    def convert_batch(self, records: list[tuple[str, Any]]) -> list[Converted]:
        """Converts ``(source, raw)`` records; bad ones come back as located ``RecordError``s."""
        out: list[Converted] = []
        for source, raw in records:
            try:
                out.append((source, self.convert(parse_record(raw))))
            except RecordError as err:
                out.append((source, err.at(source)))
        return out


class TextConverter(Converter):
    """Plain text and chat records (the text-reasoning family)."""

    family = "text"

    def convert(self, rec: dict) -> list[Segment]:
        if "messages" in rec or "conversations" in rec:
            return [self.text(role, content, field) for role, content, field in parse_turns(rec)]
        if "text" not in rec:
            raise _missing(rec, "text", "needs 'text' (plain text) or 'messages' (a chat)")
        return [self.text("assistant", _string(rec, "text"), "text")]


def format_rich_caption(rich: Any) -> str:
    """Keywords / Layout / Description as the plan text the model learns to write."""
    if not isinstance(rich, dict):
        raise RecordError(f"must be an object with keywords/layout/description, got {type(rich).__name__}", "rich_caption")
    lines = []
    for key, title in (("keywords", "Keywords"), ("layout", "Layout"), ("description", "Description")):
        value = rich.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            value = ", ".join(value)
        if value is None:
            continue
        if not isinstance(value, str):
            raise RecordError(f"must be a string (or a list of strings), got {type(value).__name__}", f"rich_caption.{key}")
        if value.strip():
            lines.append(f"{title}: {value.strip()}")
    if not lines:
        raise RecordError("has no keywords, layout or description", "rich_caption")
    return "\n".join(lines)


class GenerationConverter(Converter):
    """Text-to-audio records; audio is encoded by ``codec`` in length-sorted batches.

    Args:
        tokenizer: tokenizer path.
        codec: a ``Codec``, ``load_codec`` keyword arguments (``name``, ``path``, ``device``,
            ``num_codebooks``; how the tools pass it to worker processes), or None when every
            record carries precomputed ``codes``.
        codec_identity: sidecar identity of precomputed codes when ``codec`` is None
            (``name``, ``frame_rate``, ``num_codebooks``, ``codebook_size``).
        rich_caption: ``plan`` or ``condition`` (see the module docstring).
        codec_batch_size: clips per codec call.
        audio_root: directory relative audio paths are resolved against.
    """

    family = "generation"
    codes = True

    def __init__(self, tokenizer: str, codec=None, codec_identity: Optional[dict] = None,
                 rich_caption: str = "plan", codec_batch_size: int = 8, audio_root: str = ".",
                 audio_decoder: str = "soundfile"):
        super().__init__(tokenizer, audio_root, audio_decoder)
        if rich_caption not in ("plan", "condition"):
            raise ValueError(f"rich_caption={rich_caption!r}: choose 'plan' or 'condition'")
        if codec is None and not codec_identity:
            raise ValueError("give a codec, or codec_identity for precomputed codes")
        self.codec = load_codec(**codec) if isinstance(codec, dict) else codec
        self.identity = self.codec.identity() if self.codec is not None else dict(codec_identity)
        self.rich_caption = rich_caption
        self.codec_batch_size = codec_batch_size

    def header(self) -> dict:
        return {**super().header(), "codec": self.identity}

    def convert(self, rec: dict):
        """Messages with the audio-out content either as codes or as a waveform to encode."""
        rich = format_rich_caption(rec["rich_caption"]) if rec.get("rich_caption") is not None else None
        caption = _string(rec, "caption", required=rich is None or self.rich_caption == "plan")
        if rich is not None and self.rich_caption == "condition":
            caption, rich = rich, None
        segments = [self.text("user", caption, "caption", condition=True)]
        if rich is not None:
            segments.append(self.text("assistant", rich, "rich_caption"))
        if rec.get("codes") is not None:
            try:
                data = np.asarray(rec["codes"])
            except ValueError:
                data = None  # ragged rows
            if data is None or data.ndim != 2 or data.dtype.kind not in "iu":
                raise RecordError("must be a K x T list of integer lists (equal-length rows)", "codes")
            data = data.astype(np.int64)
            segments.append(Segment("assistant", "audio_out", data))
            return segments
        if self.codec is None:
            raise RecordError("has no precomputed 'codes' and no --codec was given to encode 'audio'", "codes")
        source, field = audio_source(rec, ("audio",), self.audio_root)
        wave = load_audio(source, self.codec.sample_rate, rec.get("start"), rec.get("end"), field, self.audio_decoder)
        if self.codec.num_frames(wave.shape[0]) < 1:
            raise RecordError(f"clip of {wave.shape[0] / self.codec.sample_rate:.3f} s is too short for one codec frame",
                              field)
        segments.append(Segment("assistant", "audio_out", wave))  # codes filled in by convert_batch
        return segments

    def convert_batch(self, records: list[tuple[str, Any]]) -> list[Converted]:
        out = super().convert_batch(records)
        if self.codec is None:  # precomputed codes only; a record with audio was rejected in convert
            return out
        return encode_audio_out(out, self.codec, self.codec_batch_size)


class UnderstandingConverter(Converter):
    """Audio + conversation records; the clip is stored for the frozen encoder.

    Args:
        tokenizer: tokenizer path.
        audio_in: encoder window shape (used when storing log-mel features).
        storage: ``pcm16`` (16 kHz int16 samples) or ``mel`` (valid log-mel frames, float32).
        audio_root: directory relative audio paths are resolved against.
    """

    family = "understanding"

    def __init__(self, tokenizer: str, audio_in: AudioInConfig, storage: str = "pcm16", audio_root: str = ".",
                 audio_decoder: str = "soundfile"):
        super().__init__(tokenizer, audio_root, audio_decoder)
        if storage not in ("pcm16", "mel"):
            raise ValueError(f"storage={storage!r}: choose 'pcm16' or 'mel'")
        self.audio_in = audio_in
        self.audio_storage = storage
        self._log_mel = LogMel(audio_in) if storage == "mel" else None

    def header(self) -> dict:
        return {**super().header(), "audio_in": {"sample_rate": AUDIO_IN_SAMPLE_RATE, "n_mels": self.audio_in.n_mels,
                                                 "window_seconds": self.audio_in.window_seconds}}

    def _audio_data(self, wave: np.ndarray) -> np.ndarray:
        pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype(np.int16)
        if self._log_mel is None:
            return pcm
        # Features of the 16-bit audio, so pcm16 and mel shards of a clip train on equal inputs.
        return np.concatenate(self._log_mel.valid_windows(pcm_to_float(pcm)), axis=1)  # [n_mels, m]

    def convert(self, rec: dict) -> list[Segment]:
        turns = parse_turns(rec)
        marked = [i for i, (_, content, _) in enumerate(turns) if SOUND_MARKER in content]
        if len(marked) > 1 or sum(c.count(SOUND_MARKER) for _, c, _ in turns) > 1:
            raise RecordError(f"has more than one {SOUND_MARKER} marker but a record holds one clip", turns[marked[-1]][2])
        if marked:
            at = marked[0]
        else:
            users = [i for i, (role, _, _) in enumerate(turns) if role == "user"]
            if not users:
                raise RecordError("has no user turn to attach the audio to", turns[0][2])
            at = users[0]
        source, field = audio_source(rec, ("audio", "sound"), self.audio_root)
        wave = load_audio(source, AUDIO_IN_SAMPLE_RATE, rec.get("start"), rec.get("end"), field, self.audio_decoder)
        segments = []
        for i, (role, content, where) in enumerate(turns):
            if i != at:
                segments.append(self.text(role, content, where))
                continue
            before, _, after = content.partition(SOUND_MARKER) if SOUND_MARKER in content else ("", "", content)
            if before.strip():
                segments.append(self.text(role, before.strip(), where))
            segments.append(Segment(role, "audio_in", self._audio_data(wave)))
            if after.strip():
                segments.append(self.text(role, after.strip(), where))
        return segments
