"""Training data for the Megatron loop: blended token shards (or synthetic rows) -> loaders of UALMBatch.

Megatron's own loader stacks items with the default collate, which cannot batch UALM rows
(variable numbers of audio-in windows, packed documents); the loop therefore runs with
``--dataloader-type external`` and builds the loaders through ``data.blend.build_data_loader``
(Megatron's ``MegatronPretrainingSampler``: a resumed run starts exactly after the consumed
samples, no sample repeated or skipped).
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from megatron_ualm.data.batch import UALMBatch, collate_packed
from megatron_ualm.data.blend import build_data_loader
from megatron_ualm.vocab import UALMVocab


class FamilyCollate:
    """``collate_packed`` plus the count of rows per data family (kept on the batch).

    Args:
        seq_length: s.
        vocab: token-id layout.
        families: family name of each blend dataset id.
        attention_mask: build the block-diagonal mask (local spec); False for TE ``thd``.
    """

    def __init__(self, seq_length: int, vocab: UALMVocab, families: Sequence[str], attention_mask: bool = True):
        self.seq_length, self.vocab, self.families, self.attention_mask = seq_length, vocab, list(families), attention_mask

    def __call__(self, items: Sequence[dict]) -> UALMBatch:
        batch = collate_packed(items, self.seq_length, self.vocab, attention_mask=self.attention_mask)
        batch.family_counts = collections.Counter(self.families[int(it["dataset_id"])] for it in items)
        return batch


def build_loader(dataset, collate: FamilyCollate, micro_batch_size: int, consumed_samples: int,
                 num_workers: int, seed: int) -> Optional[torch.utils.data.DataLoader]:
    """``data.blend.build_data_loader`` for this data-parallel rank, with family counts."""
    if dataset is None or len(dataset) == 0:
        return None
    return build_data_loader(
        dataset, collate.seq_length, collate.vocab, micro_batch_size, consumed_samples,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
        num_workers, collate_fn=collate, seed=seed,
    )
