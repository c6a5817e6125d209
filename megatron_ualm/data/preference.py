"""Preference pairs: the micro-batch type of DPO.

A pair is two conversations that share a prompt: prompt + chosen response and prompt +
rejected response. Both are laid out in the UALM sequence format with loss only on the
response messages, and batched as consecutive rows (chosen first), so the two rows of a pair
always meet in the same micro-batch on the same ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_ualm.data.batch import UALMBatch, collate_packed
from megatron_ualm.vocab import UALMVocab


@dataclass
class PairBatch:
    """A micro-batch of ``P`` preference pairs.

    Attributes:
        rows: ``2P`` rows; row ``2i`` is pair ``i``'s chosen conversation, ``2i + 1`` its
            rejected one. Loss masks select the responses.
        reference: ``[P, 2, 1 + K]`` float32 reference log-probability sums per stream
            (stream 0, then each codebook) of the chosen / rejected response; None until
            scored (and on pipeline stages that do not compute the loss).
    """

    rows: UALMBatch
    reference: Optional[torch.Tensor] = None

    @property
    def num_pairs(self) -> int:
        return self.rows.tokens.shape[0] // 2

    def to(self, device) -> "PairBatch":
        """A copy with every tensor on ``device``."""
        ref = None if self.reference is None else self.reference.to(device)
        return dataclasses.replace(self, rows=self.rows.to(device), reference=ref)


def collate_pairs(items: Sequence[dict], seq_length: int, vocab: UALMVocab) -> PairBatch:
    """Batches pair items (``PreferenceDataset`` items or ones built the same way).

    Args:
        items: dicts with ``chosen`` and ``rejected`` (``UALMDataset`` row items: ``tokens``,
            ``codes``, ``text_target``, ``code_target``, ``doc_lengths``, ``audio_in_features``,
            ``audio_in_lengths``) and ``reference`` (``[2, 1 + K]`` float32, or None).
        seq_length: s.
        vocab: pad ids.

    Returns:
        The batch; ``reference`` is set when every item has one.
    """
    rows = [row for it in items for row in (it["chosen"], it["rejected"])]
    batch = collate_packed(rows, seq_length, vocab, attention_mask=True)
    refs = [it.get("reference") for it in items]
    reference = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in refs]) if all(
        r is not None for r in refs) else None
    return PairBatch(batch, reference)
