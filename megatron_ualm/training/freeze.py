"""Which parameters train in each stage. The audio encoder is frozen in every stage."""

from __future__ import annotations

import torch

# Modality alignment: only the parts that connect audio to the (pretrained) backbone.
ALIGNMENT_TRAINABLE = ("audio_adapter.", "embedding.codebook_embeddings.", "codebook_heads.")


def apply_freeze_policy(model: torch.nn.Module, policy: str) -> int:
    """Sets ``requires_grad`` for a training stage (before the DDP wrap).

    Args:
        model: an unwrapped ``UALMModel`` stage.
        policy: ``full`` (everything but the encoder) or ``alignment`` (adapter, codebook
            embeddings and RVQ heads only).

    Returns:
        The number of trainable parameters on this rank.
    """
    if policy not in ("full", "alignment"):
        raise ValueError(f"freeze policy {policy!r}: choose 'full' or 'alignment'")
    for name, param in model.named_parameters():
        if name.startswith("audio_encoder."):
            param.requires_grad_(False)
        elif policy == "alignment":
            param.requires_grad_(name.startswith(ALIGNMENT_TRAINABLE))
        else:
            param.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
