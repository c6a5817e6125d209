"""Input embedding: stream-0 tokens + the sum of K codebook embeddings + spliced audio-in."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule

from megatron_ualm.config import UALMConfig
from megatron_ualm.vocab import UALMVocab


class UALMEmbedding(MegatronModule):
    """Sum of the stream-0 embedding and the embeddings of the non-empty codebook cells, with
    adapter outputs written over the ``<|audio_in|>`` placeholders.

    Both tables are vocab-parallel. Each TP rank looks up the rows it owns and the two partial
    sums are added *before* the single TP reduction (an all-reduce, or a reduce-scatter to the
    sequence-parallel layout), so the codebook streams cost no extra communication.
    Megatron's ``LanguageModelEmbedding`` reduces inside the lookup, hence this module; it keeps
    that module's parameter name (``word_embeddings.weight``) so GPT checkpoints, tied output
    weights and conversion tools see the usual layout.

    Args:
        config: model config.
        vocab: token-id layout.
        tp_group: tensor-parallel group.
    """

    def __init__(self, config: UALMConfig, vocab: UALMVocab, tp_group: torch.distributed.ProcessGroup):
        super().__init__(config=config)
        self.vocab = vocab
        self.tp_group = tp_group
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size,
            init_method=config.embedding_init_method, config=config, tp_group=tp_group,
        )
        # Row k * card + c is code c of codebook k (vocab.codebook_rows).
        self.codebook_embeddings = VocabParallelEmbedding(
            vocab.codebook_table_size, config.hidden_size,
            init_method=config.embedding_init_method, config=config, tp_group=tp_group,
        )
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    def _partial_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This rank's share of the stream-0 lookup, ``[b, s] -> [b, s, h]``."""
        table = self.word_embeddings
        if self.tp_group.size() == 1:
            return F.embedding(input_ids, table.weight)
        local = input_ids - table.vocab_start_index
        owned = (local >= 0) & (local < table.num_embeddings_per_partition)
        out = F.embedding(local.clamp(0, table.num_embeddings_per_partition - 1), table.weight)
        return out * owned.unsqueeze(-1).to(out.dtype)

    def _partial_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """This rank's share of the codebook sum, ``[b, K, s] -> [b, s, h]``.

        ``embedding_bag`` sums the K rows per position without materialising ``[b, s, K, h]``;
        empty cells and rows owned by other ranks get weight 0.
        """
        table = self.codebook_embeddings
        b, K, s = codes.shape
        rows = self.vocab.codebook_rows(codes).transpose(1, 2).reshape(b * s, K)
        local = rows - table.vocab_start_index
        keep = (codes != self.vocab.code_empty).transpose(1, 2).reshape(b * s, K)
        keep &= (local >= 0) & (local < table.num_embeddings_per_partition)
        out = F.embedding_bag(
            local.clamp(0, table.num_embeddings_per_partition - 1), table.weight,
            mode="sum", per_sample_weights=keep.to(table.weight.dtype),
        )
        return out.view(b, s, -1)

    def forward(
        self,
        input_ids: torch.Tensor,
        codes: torch.Tensor,
        audio_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Embeds one micro-batch.

        Args:
            input_ids: ``[b, s]`` stream-0 ids.
            codes: ``[b, K, s]`` codebook ids (``code_empty`` where none).
            audio_embeds: ``[n, h]`` adapter outputs, one row per ``<|audio_in|>``
                placeholder in row-major (sample, position) order; None when there are none.

        Returns:
            ``[s, b, h]``, or ``[s / tp, b, h]`` under sequence parallelism.
        """
        partial = self._partial_text(input_ids) + self._partial_codes(codes)  # [b, s, h]
        partial = partial.transpose(0, 1).contiguous()  # [s, b, h]
        sp = self.config.sequence_parallel
        if sp:
            emb = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        elif self.tp_group.size() > 1:
            emb = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        else:
            emb = partial
        emb = self._splice_audio(emb, input_ids, audio_embeds)
        if self.config.fp32_residual_connection:
            emb = emb.float()
        if sp:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(emb)
        return self.embedding_dropout(emb)

    def _splice_audio(
        self, emb: torch.Tensor, input_ids: torch.Tensor, audio_embeds: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Writes ``audio_embeds`` over the placeholders that fall in this rank's ``emb``."""
        if audio_embeds is None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # A captured decode step (inference/static_cache.py) cannot count placeholders (a
            # host sync); the generator never writes <|audio_in|>, so there is nothing to check.
            return emb
        sample_idx, pos_idx = (input_ids == self.vocab.audio_in).nonzero(as_tuple=True)
        n = sample_idx.numel()
        got = 0 if audio_embeds is None else audio_embeds.shape[0]
        if n != got:
            raise ValueError(
                f"the batch has {n} <|audio_in|> placeholders but the encoder produced {got} "
                "frames: audio_in_lengths must sum to the number of placeholders"
            )
        if n == 0:
            return emb
        audio_embeds = audio_embeds.to(emb.dtype)
        if self.config.sequence_parallel:
            # This rank holds positions [lo, lo + s_local). Every rank computed all adapter rows;
            # the copy op all-reduces their gradient over TP in backward, so each rank's adapter
            # sees the gradient of every row, not only of the rows in its slice.
            s_local = emb.shape[0]
            lo = self.tp_group.rank() * s_local
            audio_embeds = copy_to_tensor_model_parallel_region(audio_embeds, group=self.tp_group)
            here = (pos_idx >= lo) & (pos_idx < lo + s_local)
            pos_idx, sample_idx, audio_embeds = pos_idx[here] - lo, sample_idx[here], audio_embeds[here]
        return emb.index_put((pos_idx, sample_idx), audio_embeds)
