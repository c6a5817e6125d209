"""RMSNorm for the local (non-Transformer-Engine) spec."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(MegatronModule):
    """RMSNorm whose weight is marked ``sequence_parallel`` under sequence parallelism.

    Megatron-Core's local spec falls back to ``WrappedTorchNorm`` without apex, which refuses
    sequence parallelism: with SP each TP rank normalises a different slice of the sequence, so
    the weight gradient is partial and ``finalize_model_grads`` must all-reduce it over TP. It
    does that for parameters that carry ``sequence_parallel = True``, which this norm sets.

    Args:
        config: the transformer config (``sequence_parallel`` is read from it).
        hidden_size: normalised dimension.
        eps: epsilon inside the square root.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device="cpu" if config.use_cpu_initialization else None)
        )
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[s, b, h] -> [s, b, h]``."""
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
