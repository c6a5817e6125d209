"""Synthetic micro-batches that mix the three data families, for tests, benchmarks, smoke runs.

Random ids, codes and log-mel features laid out in the real sequence format: a text chat, an
audio-understanding sample (audio in, text answer) and a text-to-audio sample (caption in,
codes out). Deterministic for a seed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_ualm.config import UALMConfig
from megatron_ualm.data.batch import UALMBatch, collate
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
