"""The K RVQ output heads, one tensor-parallel GEMM for all codebooks."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
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
        self._register_load_state_dict_pre_hook(self._from_logical_layout)

    def _from_logical_layout(self, state_dict, prefix, *args, **kwargs):
        key = f"{prefix}weight"
        if key in state_dict and state_dict[key].dim() == 3:
            state_dict[key] = state_dict[key].reshape(-1, state_dict[key].shape[-1])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[s(/tp), b, h] -> [s, b, K, card / tp]`` logits (this rank's vocab slice)."""
        logits, _ = super().forward(hidden_states)
        return logits.unflatten(-1, (self.num_codebooks, self.card_per_partition))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The weight as a logical ``[K, card, h]`` tensor sharded over TP on dim 1."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        key = f"{prefix}weight"
        return {
            key: make_tp_sharded_tensor_for_checkpoint(
                self.weight.view(self.num_codebooks, self.card_per_partition, -1), key,
                tp_axis=1, prepend_offsets=sharded_offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
            )
        }
