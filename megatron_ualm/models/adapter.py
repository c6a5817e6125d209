"""The MLP adapter from encoder features to the LM's hidden size."""

from __future__ import annotations

import copy

import torch.nn.functional as F
from megatron.core.models.audio.audio_projector import AudioProjection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules

from megatron_ualm.config import UALMConfig


def build_adapter(
    config: UALMConfig, encoder_hidden_size: int, stack_factor: int, tp_group=None
) -> AudioProjection:
    """Megatron-Core's ``AudioProjection`` (frame stacking + 2-layer GELU MLP), tensor-parallel.

    Args:
        config: model config; the adapter takes its parallel settings and hidden size.
        encoder_hidden_size: d, the encoder's output width.
        stack_factor: encoder frames stacked into one adapter frame (2 for a 50 Hz Whisper
            encoder, 1 for the 25 Hz Qwen2-Audio / AF-Whisper encoders).
    """
    # The projector is an MLP built from a TransformerConfig; give it its own copy with the
    # adapter's width and a plain (non-gated, biased) GELU MLP. Sequence parallelism does not
    # apply: adapter rows are audio frames, not sequence positions.
    adapter_config = copy.deepcopy(config)
    adapter_config.ffn_hidden_size = config.audio_adapter_ffn_hidden_size
    adapter_config.gated_linear_unit = False
    adapter_config.activation_func = F.gelu
    adapter_config.add_bias_linear = True
    adapter_config.bias_activation_fusion = False
    adapter_config.sequence_parallel = False
    adapter_config.fp8 = None
    return AudioProjection(
        config=adapter_config,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        projector_type="mlp",
        input_size=encoder_hidden_size,
        stack_factor=stack_factor,
        tp_group=tp_group,
    )
