"""Synthetic data in the real sequence format, for tests, benchmarks and smoke runs.

Random ids, codes and log-mel features, deterministic for a seed:

- ``mixed_batch`` / ``SyntheticDataset`` (``--synthetic-data``): the three pretraining families,
  a text chat, an audio-understanding sample (audio in, text answer) and a text-to-audio sample
  (caption in, codes out);
- ``synthetic_pair_batch``: DPO preference pairs of three kinds, cycled: text-to-audio (caption
  -> chosen / rejected codes of different lengths), understanding (audio in + question -> two
  text answers) and reasoning (system + request -> rich-caption text then audio, both sides).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_ualm.config import UALMConfig
from megatron_ualm.data.audio import AudioInConfig
from megatron_ualm.data.batch import UALMBatch, collate
from megatron_ualm.data.preference import PairBatch, collate_pairs
from megatron_ualm.data.sequence import Message, UALMSample, build_sample
from megatron_ualm.models.encoder import window_geometry
from megatron_ualm.vocab import UALMVocab


def mixed_samples(config: UALMConfig, seq_length: int, generator: torch.Generator) -> tuple[list[UALMSample], list[int]]:
    """A text, an understanding and a generation sample (FAMILIES order), each fitting
    ``seq_length + 1``.

    Returns:
        The samples and the 25 Hz frame counts of their audio-in messages.
    """
    vocab = UALMVocab.from_config(config)
    budget = seq_length + 1
    K = config.num_codebooks

    def text(n: int) -> list[int]:
        return torch.randint(0, vocab.text_vocab_size, (n,), generator=generator).tolist()

    # Each sample has 1 bos + 3 specials per message; split the rest between the contents.
    room = budget - 1 - 3 * 2
    chat = [Message("user", "text", text=text(room // 3)), Message("assistant", "text", text=text(room - room // 3))]
    audio_in = []
    if config.audio_encoder_type is not None:
        _, _, window_frames = window_geometry(config)
        frames = min(window_frames, max(1, room // 2))
        audio_in = [frames]
        understanding = [
            Message("user", "audio", audio_in_frames=frames),
            Message("assistant", "text", text=text(room - frames)),
        ]
    else:
        understanding = [Message("user", "text", text=text(room // 2)), Message("assistant", "text", text=text(room // 2))]
    caption = max(1, room // 4)
    num_frames = max(1, room - caption - (K - 1))
    codes = torch.randint(0, config.codebook_size, (K, num_frames), generator=generator)
    generation = [Message("user", "text", text=text(caption)), Message("assistant", "audio", codes=codes)]
    samples = [build_sample(m, vocab) for m in (chat, understanding, generation)]
    return samples, audio_in


FAMILIES = ("text", "understanding", "generation")


def mixed_batch(
    config: UALMConfig,
    seq_length: int,
    seed: int = 0,
    batch_size: Optional[int] = None,
    families: Sequence[str] = FAMILIES,
) -> UALMBatch:
    """A batch of the given families (repeated in order to ``batch_size`` samples).

    Args:
        config: model config (vocabulary, codebooks, encoder geometry).
        seq_length: s.
        seed: RNG seed.
        batch_size: samples (default: one per family).
        families: which of ``FAMILIES`` to draw from, in order.
    """
    generator = torch.Generator().manual_seed(seed)
    samples, _ = mixed_samples(config, seq_length, generator)
    by_family = dict(zip(FAMILIES, samples))
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
    batch_size = batch_size or len(families)
    picked = [by_family[families[i % len(families)]] for i in range(batch_size)]
    n_windows = sum(len(s.audio_in_frames) for s in picked)
    features = None
    if n_windows:
        mels, window, _ = window_geometry(config)
        features = torch.randn(n_windows, mels, window, generator=generator)
    return collate(picked, seq_length, UALMVocab.from_config(config), audio_in_features=features)


class SyntheticDataset(torch.utils.data.Dataset):
    """Rows of generated text / understanding / generation samples, in UALMDataset's item format.

    Item ``i`` is a function of (seed, i) only. Used for smoke runs and throughput benchmarks
    where real shards are not at hand.

    Args:
        config: model config (vocabulary, codebooks, encoder window).
        seq_length: s.
        num_samples: rows.
        seed: base seed.
    """

    def __init__(self, config: UALMConfig, seq_length: int, num_samples: int, seed: int = 0):
        self.config, self.seq_length, self.num_samples, self.seed = config, seq_length, num_samples, seed
        self.audio_in = AudioInConfig.from_model_config(config) if config.audio_encoder_type else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        samples, frames = mixed_samples(self.config, self.seq_length, generator)
        family = int(idx) % len(FAMILIES)
        sample = samples[family]
        n = len(sample.audio_in_frames)
        window = (self.audio_in.n_mels, self.audio_in.window_mel_frames) if self.audio_in else (0, 0)
        return {
            "dataset_id": family,
            "tokens": sample.tokens,
            "codes": sample.codes,
            "text_target": sample.text_target,
            "code_target": sample.code_target,
            "doc_lengths": torch.tensor([len(sample)]),
            "audio_in_features": torch.randn(n, *window, generator=generator),
            "audio_in_lengths": torch.tensor(sample.audio_in_frames, dtype=torch.long),
        }


# ---------------------------------------------------------------------------------------------
# Preference pairs.

PAIR_KINDS = ("tta", "understanding", "reasoning")


def row_item(messages: list[Message], vocab: UALMVocab, features: Optional[torch.Tensor] = None) -> dict:
    """A ``UALMDataset``-style row item of one conversation (``features``: its audio-in windows)."""
    sample = build_sample(messages, vocab)
    frames = sample.audio_in_frames
    return {
        "tokens": sample.tokens, "codes": sample.codes, "text_target": sample.text_target,
        "code_target": sample.code_target, "doc_lengths": torch.tensor([len(sample)]),
        "audio_in_features": features if features is not None else torch.zeros(0, 1, 1),
        "audio_in_lengths": torch.tensor(frames, dtype=torch.long),
    }


def synthetic_pair_items(config: UALMConfig, seq_length: int, num_pairs: int, seed: int = 0) -> list[dict]:
    """``num_pairs`` pair items (``collate_pairs`` input) that fit ``seq_length + 1`` positions."""
    vocab = UALMVocab.from_config(config)
    g = torch.Generator().manual_seed(seed)
    K, budget = config.num_codebooks, seq_length + 1

    def text(n: int) -> list[int]:
        return torch.randint(0, vocab.text_vocab_size, (max(1, n),), generator=g).tolist()

    def codes(frames: int) -> torch.Tensor:
        return torch.randint(0, config.codebook_size, (K, max(1, frames)), generator=g)

    items = []
    for i in range(num_pairs):
        kind = PAIR_KINDS[i % len(PAIR_KINDS)]
        features = None
        room = budget - 1 - 3 * 3  # bos, and up to three messages of 3 markers each
        if kind == "understanding" and config.audio_encoder_type is not None:
            mels, window, per_window = window_geometry(config)
            frames = min(per_window, room // 3)
            features = torch.randn(1, mels, window, generator=g)
            prompt = [Message("user", "audio", audio_in_frames=frames, loss=False),
                      Message("user", "text", text=text(room // 6), loss=False)]
            sides = [[Message("assistant", "text", text=text(room // 4 - j))] for j in range(2)]
        elif kind == "reasoning":
            prompt = [Message("system", "text", text=text(room // 8)), Message("user", "text", text=text(room // 8))]
            room -= 3
            sides = [[Message("assistant", "text", text=text(room // 8 + j)),
                      Message("assistant", "audio", codes=codes(room // 3 - (K - 1) - 2 * j))] for j in range(2)]
        else:
            prompt = [Message("user", "text", text=text(room // 4))]
            sides = [[Message("assistant", "audio", codes=codes(room // 2 - (K - 1) - 3 * j))] for j in range(2)]
        chosen, rejected = (row_item(prompt + side, vocab, features) for side in sides)
        items.append({"chosen": chosen, "rejected": rejected, "reference": None})
    return items


def synthetic_pair_batch(config: UALMConfig, seq_length: int, num_pairs: int = 3, seed: int = 0) -> PairBatch:
    """A ``PairBatch`` of synthetic pairs (no reference log-probs yet)."""
    return collate_pairs(synthetic_pair_items(config, seq_length, num_pairs, seed), seq_length,
                         UALMVocab.from_config(config))
