"""Model FLOPs of a UALM training step, as Megatron counts them, plus the audio terms.

Backbone (fwd + bwd, causal attention), per token, from
``megatron/training/training.py:num_floating_point_operations``::

    6 * [L * (m * h * f + h * (q + 2k) + q * h) + h * V] + 6 * L * q * s

with m = 3 for a gated (SwiGLU) MLP, q = heads * head_dim, k = kv_heads * head_dim. UALM adds
terms that the backbone formula does not see, each counted explicitly:

- RVQ heads: ``6 * h * K * card`` per position (the heads run at every position);
- adapter: ``6 * P_adapter`` per adapter frame (trainable 2-layer MLP);
- frozen encoder: forward only, ``2 * P_layers`` per encoder position plus attention
  ``4 * T^2 * d`` per layer and the conv stem, per window.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ualm.config import UALMConfig


def backbone_flops_per_token(config: UALMConfig, seq_length: int) -> float:
    """Megatron's fwd+bwd FLOPs per token of the decoder, embedding-free, plus the text head."""
    L, h, f, V = config.num_layers, config.hidden_size, config.ffn_hidden_size, config.vocab_size
    q = config.num_attention_heads * config.kv_channels
    k = (config.num_query_groups or config.num_attention_heads) * config.kv_channels
    mlp = (3 if config.gated_linear_unit else 2) * h * f
    return 6.0 * (L * (mlp + h * (q + 2 * k) + q * h) + h * V) + 6.0 * L * q * seq_length


def codebook_heads_flops_per_token(config: UALMConfig) -> float:
    """fwd+bwd FLOPs per position of the K RVQ heads."""
    return 6.0 * config.hidden_size * config.num_codebooks * config.codebook_size


def adapter_flops_per_frame(config: UALMConfig, encoder_hidden_size: int, stack_factor: int = 1) -> float:
    """fwd+bwd FLOPs per adapter output frame (2-layer MLP d*stack -> f_a -> h)."""
    fa = config.audio_adapter_ffn_hidden_size
    return 6.0 * (encoder_hidden_size * stack_factor * fa + fa * config.hidden_size)


def encoder_flops_per_window(hf_config) -> float:
    """Forward FLOPs of a Whisper-family encoder over one padded window (it is frozen)."""
    d, ffn, layers = hf_config.d_model, hf_config.encoder_ffn_dim, hf_config.encoder_layers
    T = hf_config.max_source_positions  # positions after the stride-2 conv stem
    stem = 2.0 * 3 * hf_config.num_mel_bins * d * (2 * T) + 2.0 * 3 * d * d * T
    per_layer = 2.0 * (4 * d * d + 2 * d * ffn) * T + 4.0 * T * T * d
    return stem + layers * per_layer


@dataclass
class StepFlops:
    """FLOPs of one step, by part."""

    backbone: float
    codebook_heads: float
    adapter: float
    encoder: float

    @property
    def total(self) -> float:
        return self.backbone + self.codebook_heads + self.adapter + self.encoder


def step_flops(
    config: UALMConfig,
    num_sequences: int,
    seq_length: int,
    adapter_frames: int = 0,
    encoder_windows: int = 0,
    encoder_hf_config=None,
) -> StepFlops:
    """FLOPs of a step over ``num_sequences`` sequences of ``seq_length`` positions.

    Args:
        config: model config.
        num_sequences: sequences in the step (micro-batches x micro-batch size x DP).
        seq_length: s.
        adapter_frames: audio-in frames that went through the adapter (padded windows count
            in full: the adapter projects whole windows).
        encoder_windows: encoder windows run.
        encoder_hf_config: the encoder's ``transformers`` config (for its shapes).
    """
    tokens = num_sequences * seq_length
    encoder = 0.0
    adapter = 0.0
    if encoder_windows:
        encoder = encoder_windows * encoder_flops_per_window(encoder_hf_config)
        adapter = adapter_frames * adapter_flops_per_frame(config, encoder_hf_config.d_model)
    return StepFlops(
        backbone=tokens * backbone_flops_per_token(config, seq_length),
        codebook_heads=tokens * codebook_heads_flops_per_token(config),
        adapter=adapter,
        encoder=encoder,
    )
