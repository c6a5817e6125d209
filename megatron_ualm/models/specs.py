"""Decoder block specs: the local spec (CPU, tests) and the Transformer Engine spec (GPU, FP8).

Both are Megatron-Core's GPT layer specs for a Qwen2.5 block; the model code never names a
backend, ``UALMConfig.transformer_impl`` picks one here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron_ualm.config import UALMConfig
from megatron_ualm.models.norms import RMSNorm


def layer_spec(config: UALMConfig) -> ModuleSpec:
    """The transformer-layer spec for ``config.transformer_impl``."""
    if config.transformer_impl == "transformer_engine":
        # Fused RMSNorm+QKV / RMSNorm+FC1 (TELayerNormColumnParallelLinear) and TE attention.
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    # Swap the torch norm wrapper (which refuses sequence parallelism) for RMSNorm.
    submodules = dataclasses.replace(
        spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm
    )
    return dataclasses.replace(spec, submodules=submodules)


def final_norm(config: UALMConfig):
    """The norm after the last layer."""
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def decoder_block_spec(config: UALMConfig, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage: its layers plus the final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec(config)] * num_layers, layer_norm=final_norm(config)
    )
