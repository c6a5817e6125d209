"""``UALMDataset``: a Megatron dataset of packed UALM training sequences over one shard.

Each item is one row of ``sequence_length + 1`` positions (before the input/label shift)
packing whole documents (records) in the sequence format of ``megatron_ualm.data.sequence``.

- Packing: documents are shuffled per epoch (seeded) and placed first-fit into a few open
  rows (``packing_open_bins``); a full or least-room row is closed when no open row fits.
  No document is split across rows.
- Over-long documents (rare: the tools keep records small) are shortened by this rule,
  never mid-frame: (1) the longest audio message loses whole frames (25 Hz audio-in frames or
  codec frames, the latter keeping their K - 1 delay steps) until the document fits, keeping
  at least one frame; (2) then trailing messages are dropped; (3) a single remaining text
  message is cut to whole tokens.
- CFG condition dropout: with probability ``cfg_condition_dropout``, a document's condition
  messages (the generation caption, flagged in the shard) become empty text.
- Randomness of an item is drawn from a generator keyed by (dataset, item index) alone, so
  item ``i`` is the same whether or not items ``< i`` were read: training resumes from a
  consumed-samples count exactly.

The shard is checked when it is opened (``ShardReader``: file sizes against the index,
sidecar counts against both), so a damaged shard fails when the datasets are built, naming
the shard and the file, not at a training step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_ualm.data.audio import (AudioInConfig, LogMel, MEL_PER_AUDIO_IN_FRAME, SAMPLES_PER_AUDIO_IN_FRAME,
                                      pad_mel_windows, pcm_to_float)
from megatron_ualm.data.sequence import Message, build_sample
from megatron_ualm.data.shards import Segment, ShardReader, document_length
from megatron_ualm.files import atomic_file
from megatron_ualm.vocab import UALMVocab

logger = logging.getLogger(__name__)


@dataclass
class UALMDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config plus what UALM samples need.

    ``sequence_length`` is the model's input length s; rows hold ``s + 1`` positions.
    """

    vocab: Optional[UALMVocab] = None
    """The token-id layout (text ids, specials, K, card); required."""

    audio_in: Optional[AudioInConfig] = None
    """Encoder window shape; required when a shard stores audio in."""

    cfg_condition_dropout: float = 0.05
    """Probability that a generation document's condition becomes empty."""

    packing_open_bins: int = 8
    """Rows kept open while packing (more: fuller rows, less shuffling across rows)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab is None:
            raise ValueError("UALMDatasetConfig needs vocab=UALMVocab.from_config(model_config)")
        if not 0.0 <= self.cfg_condition_dropout < 1.0:
            raise ValueError(f"cfg_condition_dropout={self.cfg_condition_dropout} must be in [0, 1)")
        if self.packing_open_bins < 1:
            raise ValueError(f"packing_open_bins={self.packing_open_bins} must be >= 1")

    @property
    def layout(self) -> list:
        """What of the vocabulary and audio config decides sample contents (cache key)."""
        v, a = self.vocab, self.audio_in
        return [v.text_vocab_size, v.vocab_size, v.num_codebooks, v.codebook_size,
                None if a is None else [a.n_mels, a.window_seconds]]


def cut_segment(segment: Segment, units: int) -> Segment:
    """The first ``units`` text tokens / codec frames / 25 Hz audio-in frames of a message."""
    d = segment.data
    if segment.kind == "text":
        d = d[:units]
    elif segment.kind == "audio_out":
        d = d[:, :units]
    elif d.ndim == 1:
        d = d[: units * SAMPLES_PER_AUDIO_IN_FRAME]
    else:
        d = d[:, : units * MEL_PER_AUDIO_IN_FRAME]
    return Segment(segment.role, segment.kind, d, segment.condition, segment.loss)


def fit_to_length(segments: list[Segment], budget: int, num_codebooks: int) -> list[Segment]:
    """Shortens a document to at most ``budget`` positions by the rule in the module docstring."""
    excess = document_length(segments, num_codebooks) - budget
    if excess <= 0:
        return segments
    segments = list(segments)
    audio = [i for i, s in enumerate(segments) if s.kind != "text"]
    if audio:
        i = max(audio, key=lambda j: segments[j].units())
        segments[i] = cut_segment(segments[i], max(1, segments[i].units() - excess))
    while len(segments) > 1 and document_length(segments, num_codebooks) > budget:
        segments.pop()
    excess = document_length(segments, num_codebooks) - budget
    if excess > 0 and segments[0].kind == "text":
        segments[0] = cut_segment(segments[0], max(0, segments[0].units() - excess))
    if document_length(segments, num_codebooks) > budget:
        raise ValueError(f"sequence length {budget - 1} cannot hold even one frame of a {segments[0].kind} message")
    return segments


def drop_condition(segments: list[Segment], probability: float, rng: np.random.Generator) -> list[Segment]:
    """Replaces the condition messages by empty text with ``probability`` (CFG training)."""
    if probability <= 0 or not any(s.condition for s in segments) or rng.random() >= probability:
        return segments
    return [Segment(s.role, "text", np.zeros(0, np.int32), True, s.loss) if s.condition else s for s in segments]


def pack_documents(lengths: np.ndarray, capacity: int, open_bins: int, order: np.ndarray) -> list[list[int]]:
    """First-fit packing over a few open rows, in the given document order.

    Args:
        lengths: positions per document, each ``<= capacity``.
        capacity: positions per row.
        open_bins: rows kept open.
        order: document visiting order (a permutation).

    Returns:
        Rows as lists of document indices, in the order they were closed.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    members: list[list[int]] = []
    for d in order.tolist():
        n = int(lengths[d])
        for j, r in enumerate(room):
            if n <= r:
                room[j] -= n
                members[j].append(d)
                break
        else:
            if len(room) == open_bins:
                j = int(np.argmin(room))
                rows.append(members.pop(j))
                room.pop(j)
            room.append(capacity - n)
            members.append([d])
    rows.extend(members)
    return rows


def check_fits_model(meta: dict, path: str, vocab: UALMVocab, audio_in: Optional[AudioInConfig],
                     reads_pairs: bool) -> None:
    """Whether a shard (its sidecar ``meta``) can train a model with this vocabulary and encoder.

    A shard written with an audio-in stream but without a single audio-in clip (text-only chat or
    preference records with the tools' default ``--audio-in-storage``) fits a model without an
    encoder; a shard holding clips does not.

    Raises:
        ValueError: one line naming the shard and what to change.
    """
    v = vocab
    if meta["family"] == "preference" and not reads_pairs:
        raise ValueError(f"{path} holds DPO preference pairs (chosen and rejected); train on it with "
                         "python -m megatron_ualm.dpo, not in a packed blend")
    if reads_pairs and meta["family"] != "preference":
        raise ValueError(f"{path} is a {meta['family']} shard, not preference pairs (write those with "
                         "tools/preprocess_preferences.py)")
    tok = meta["tokenizer"]["vocab_size"]
    if tok > v.text_vocab_size:
        raise ValueError(f"{path}: tokenizer has {tok} ids but the model's text_vocab_size is {v.text_vocab_size}")
    codec = meta.get("codec")
    if codec and (codec["num_codebooks"], codec["codebook_size"]) != (v.num_codebooks, v.codebook_size):
        raise ValueError(
            f"{path}: codes are K={codec['num_codebooks']} x card={codec['codebook_size']}, the model "
            f"expects K={v.num_codebooks} x card={v.codebook_size}")
    clips = float(meta.get("counts", {}).get("audio_in_seconds", 0.0))
    if "audio" not in meta["streams"] or clips <= 0:
        return
    if audio_in is None:
        raise ValueError(f"{path} holds {clips:.1f} s of audio in, but the model has no audio encoder: train a model "
                         "with one (a flavor or checkpoint with an encoder, without --no-audio-encoder), or leave "
                         "those records out of the blend")
    stored = meta["audio_in"]
    if meta["audio_in_storage"] == "mel" and (stored["n_mels"], stored["window_seconds"]) != (audio_in.n_mels,
                                                                                             audio_in.window_seconds):
        raise ValueError(f"{path}: log-mel features are {stored['n_mels']} mels / {stored['window_seconds']} s "
                         f"windows, the encoder reads {audio_in.n_mels} / {audio_in.window_seconds} s")


class UALMDataset(MegatronDataset):
    """Packed UALM rows over one shard; built by ``BlendedMegatronDatasetBuilder``.

    Args:
        dataset: the shard.
        dataset_path: the shard directory.
        indices: record ids of this split (at least one).
        num_samples: rows wanted (None: one epoch).
        index_split: train / valid / test.
        config: the dataset config.

    Attributes:
        shard_index: the shard's index in its blend plan, set by ``blend.build_datasets``.
            Items then carry it as ``dataset_id``, in place of ``BlendedDataset``'s own index
            (the index among the split's datasets), which differs when a shard too small for a
            split is left out of it.
    """

    shard_index: Optional[int] = None
    reads_pairs = False
    """Reads preference-pair shards (``data.preference.PreferenceDataset``) instead of refusing them."""

    def __init__(self, dataset: ShardReader, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: UALMDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.vocab: UALMVocab = config.vocab
        self.capacity = config.sequence_length + 1
        self._check_compatible()
        self._lengths = np.minimum(dataset.document_lengths()[indices], self.capacity)
        self.row_offsets, self.row_documents = self._build_rows()
        self._seed = int(self.unique_description_hash[:12], 16)
        self._log_mel: Optional[LogMel] = None

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: ShardReader) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: UALMDatasetConfig) -> ShardReader:
        return ShardReader(dataset_path)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return MegatronDataset._key_config_attributes() + ["layout", "cfg_condition_dropout", "packing_open_bins"]

    def _check_compatible(self) -> None:
        check_fits_model(self.dataset.meta, self.dataset_path, self.vocab, self.config.audio_in, self.reads_pairs)

    def _build_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Row offsets ``[R + 1]`` into row documents (positions in ``indices``), cached on disk."""
        cache = self.config.path_to_cache
        paths = None
        if cache:
            base = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}")
            paths = (base + "-row_offsets.npy", base + "-row_documents.npy")
            if all(os.path.isfile(p) for p in paths):
                return np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r")
        if len(self._lengths) == 0:
            raise ValueError(f"{self.dataset_path}: the {self.index_split.name} split holds no records (blend."
                             "build_datasets leaves such a shard out of the split)")
        rng = np.random.RandomState(self.config.random_seed)
        rows: list[list[int]] = []
        while not rows or (self.num_samples is not None and len(rows) < self.num_samples):
            rows.extend(pack_documents(self._lengths, self.capacity, self.config.packing_open_bins,
                                       rng.permutation(len(self._lengths))))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        documents = np.fromiter((d for r in rows for d in r), dtype=np.int64, count=int(offsets[-1]))
        if paths:
            os.makedirs(cache, exist_ok=True)
            for path, array in zip(paths, (offsets, documents)):
                with atomic_file(path) as tmp:
                    np.save(tmp, array)
        return offsets, documents

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def tokens_per_row(self) -> float:
        """Mean non-padding positions of the packed rows built (before CFG dropout)."""
        return float(self._lengths[np.asarray(self.row_documents)].sum()) / len(self)

    def _messages(self, segments: list[Segment], windows: list[np.ndarray], lengths: list[int]) -> list[Message]:
        """Messages for ``build_sample``; appends each audio-in message's encoder windows."""
        messages = []
        for s in segments:
            if s.kind == "text":
                messages.append(Message(s.role, "text", text=s.data, loss=s.loss))
            elif s.kind == "audio_out":
                messages.append(Message(s.role, "audio", codes=torch.from_numpy(s.data.astype(np.int64)), loss=s.loss))
            else:
                a = self.config.audio_in
                if s.data.ndim == 1:
                    if self._log_mel is None:
                        self._log_mel = LogMel(a)
                    valid = self._log_mel.valid_windows(pcm_to_float(s.data))
                else:
                    valid = [s.data[:, b:b + a.window_mel_frames] for b in range(0, s.data.shape[1], a.window_mel_frames)]
                frames = [v.shape[1] // MEL_PER_AUDIO_IN_FRAME for v in valid]
                windows.extend(valid)
                lengths.extend(frames)
                messages.append(Message(s.role, "audio", audio_in_frames=sum(frames), loss=s.loss))
        return messages

    def __getitem__(self, idx: int) -> dict:
        """One packed row.

        Returns:
            dict with ``tokens [L]``, ``codes [K, L]``, ``text_target [L]``, ``code_target [K, L]``
            (unshifted, ``L <= sequence_length + 1``), ``doc_lengths [d]``, ``audio_in_features
            [n, n_mels, window]`` and ``audio_in_lengths [n]`` (and ``dataset_id`` when
            ``shard_index`` is set); batch with ``collate_packed``.
        """
        rng = np.random.default_rng([self._seed, int(idx)])
        docs = self.row_documents[self.row_offsets[idx]:self.row_offsets[idx + 1]]
        documents = [drop_condition(self.dataset.document(int(self.indices[d])), self.config.cfg_condition_dropout, rng)
                     for d in docs]
        item = {} if self.shard_index is None else {"dataset_id": self.shard_index}
        return {**item, **self.row_item(documents)}

    def row_item(self, documents: list[list[Segment]]) -> dict:
        """One row laying out ``documents`` one after the other, each fit to the row (item format
        of ``__getitem__``, without ``dataset_id``)."""
        samples, windows, lengths = [], [], []
        for segments in documents:
            segments = fit_to_length(segments, self.capacity, self.vocab.num_codebooks)
            samples.append(build_sample(self._messages(segments, windows, lengths), self.vocab))
        if windows:
            features = pad_mel_windows(windows, self.config.audio_in)  # [n, n_mels, window]
        else:
            a = self.config.audio_in or AudioInConfig()
            features = torch.zeros(0, a.n_mels, a.window_mel_frames)
        return {
            "tokens": torch.cat([s.tokens for s in samples]),
            "codes": torch.cat([s.codes for s in samples], dim=1),
            "text_target": torch.cat([s.text_target for s in samples]),
            "code_target": torch.cat([s.code_target for s in samples], dim=1),
            "doc_lengths": torch.tensor([len(s) for s in samples], dtype=torch.long),
            "audio_in_features": features,
            "audio_in_lengths": torch.tensor(lengths, dtype=torch.long),
        }
