"""The K RVQ output heads, one tensor-parallel GEMM for all codebooks."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.utils import make_tp_sharded_tensor_for_checkpoint
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_ualm.config import UALMConfig


class CodebookHeads(tensor_parallel.ColumnParallelLinear):
    """Logits of all K codebooks from the decoder's last hidden states.

    Each TP rank holds, for every codebook, the same slice ``[r * card / tp, (r + 1) * card / tp)``
    of its codes, stored as one ``[K * card / tp, h]`` weight so a single GEMM serves all heads
    and vocab-parallel cross-entropy applies per codebook. The logical (checkpoint) layout is
    ``[K, card, h]`` sharded on dim 1, so checkpoints reshard across TP sizes.

    Args:
        config: model config.
        tp_group: tensor-parallel group.
    """

    def __init__(self, config: UALMConfig, tp_group: torch.distributed.ProcessGroup):
        super().__init__(
            config.hidden_size, config.num_codebooks * config.codebook_size,
            config=config, init_method=config.init_method, bias=False, gather_output=False,
            skip_bias_add=False, tp_group=tp_group,
        )
        self.num_codebooks = config.num_codebooks
        self.card_per_partition = config.codebook_size // self.tp_group.size()
        if config.use_cpu_initialization and config.perform_initialization:
            # The parent sliced a [K * card, h] master rank-contiguously; re-slice a logical
            # [K, card, h] master so a TP=1 and a TP=n model built from one seed agree.
            master = torch.empty(config.num_codebooks, config.codebook_size, config.hidden_size, dtype=torch.float32)
            config.init_method(master)
            r, c = self.tp_group.rank(), self.card_per_partition
            with torch.no_grad():
                self.weight.copy_(master[:, r * c:(r + 1) * c].reshape_as(self.weight))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s(/tp), b, h] -> [s, b, K, card / tp]`` logits (this rank's vocab slice)."""
        logits, _ = super().forward(hidden_states)
        return logits.unflatten(-1, (self.num_codebooks, self.card_per_partition))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The weight as a logical ``[K, card, h]`` tensor sharded over TP on dim 1.

        A ``ShardedTensorFactory`` whose data is the parameter itself, so the optimizer maps
        its states onto it; the factory reshapes to and from the logical layout.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        key = f"{prefix}weight"
        K, c = self.num_codebooks, self.card_per_partition
        tp_rank, tp_size = self.tp_group.rank(), self.tp_group.size()
        n_pre = len(sharded_offsets)
        replica_id = make_tp_sharded_tensor_for_checkpoint(
            self.weight, key, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        ).replica_id

        def build(key, t, replica_id, flattened_range):
            if flattened_range is not None:
                raise ValueError("codebook_heads.weight does not support flattened optimizer shards")
            return ShardedTensor.from_rank_offsets(
                key, t.view(K, c, -1), *sharded_offsets, (n_pre + 1, tp_rank, tp_size),
                replica_id=replica_id, prepend_axis_num=n_pre,
            )

        def merge(loaded):
            return loaded.reshape(K * c, -1)

        return {key: ShardedTensorFactory(key, self.weight, build, merge, replica_id=replica_id)}
