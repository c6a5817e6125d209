"""Synthetic preference pairs in the real sequence format, for tests and benchmarks.

Three kinds, cycled: text-to-audio (caption -> chosen / rejected codes of different lengths),
understanding (audio in + question -> two text answers), and reasoning (system + request ->
rich-caption text then audio, both sides). Deterministic for a seed.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_ualm.config import UALMConfig
from megatron_ualm.data.preference import PairBatch, collate_pairs
from megatron_ualm.data.sequence import Message, build_sample
from megatron_ualm.models.encoder import window_geometry
from megatron_ualm.vocab import UALMVocab

KINDS = ("tta", "understanding", "reasoning")


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
        kind = KINDS[i % len(KINDS)]
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
