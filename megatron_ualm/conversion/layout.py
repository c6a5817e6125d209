"""Tensor layouts of a Qwen2 decoder in Hugging Face and in Megatron-Core, and the maps between.

All functions here work on *global* (unsharded) tensors; tensor and pipeline parallel
sharding is the business of Megatron's distributed checkpoint format. Pure torch.

Megatron's fused QKV projection keeps the heads grouped per KV (query) group: for each of the
``ng`` groups, its ``nh / ng`` query heads, then its key head, then its value head::

    [q(g0,h0) .. q(g0,h_{r-1}), k(g0), v(g0), q(g1,h0) .. , k(g1), v(g1), ...]   r = nh / ng

so that splitting dim 0 into TP-contiguous blocks hands each rank whole groups. The gated MLP's
``linear_fc1`` is ``[gate; up]`` stacked on dim 0 (``gate_proj`` first, as SwiGLU reads it).
"""

from __future__ import annotations

from typing import Dict

import torch


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """HF ``q_proj`` / ``k_proj`` / ``v_proj`` -> Megatron ``linear_qkv`` (weight or bias).

    Args:
        q: ``[nh * d, h]`` weight or ``[nh * d]`` bias.
        k: ``[ng * d, h]`` or ``[ng * d]``.
        v: like ``k``.
        num_heads: nh, attention heads.
        num_groups: ng, KV heads (query groups).

    Returns:
        ``[(nh + 2 * ng) * d, h]`` (or ``[(nh + 2 * ng) * d]``) in Megatron's grouped order.
    """
    d = k.shape[0] // num_groups
    tail = q.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups, d, *tail)  # [ng, r, d, (h)]
    k = k.reshape(num_groups, 1, d, *tail)  # [ng, 1, d, (h)]
    v = v.reshape(num_groups, 1, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)  # [ng * (r + 2) * d, (h)]


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv``: Megatron ``linear_qkv`` -> HF ``(q, k, v)``."""
    r = num_heads // num_groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, r + 2, -1, *tail)  # [ng, r + 2, d, (h)]
    q = grouped[:, :r].reshape(-1, *tail)  # [nh * d, (h)]
    k = grouped[:, r].reshape(-1, *tail)  # [ng * d, (h)]
    v = grouped[:, r + 1].reshape(-1, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def hf_layer_to_megatron(hf: Dict[str, torch.Tensor], num_heads: int, num_groups: int) -> Dict[str, torch.Tensor]:
    """One decoder layer, HF names (relative to ``model.layers.N.``) -> Megatron names (relative to
    ``decoder.layers.N.``, local-spec state-dict names)."""
    attn = "self_attn."
    return {
        "input_layernorm.weight": hf["input_layernorm.weight"],
        "self_attention.linear_qkv.weight": fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], num_heads, num_groups
        ),
        "self_attention.linear_qkv.bias": fuse_qkv(
            hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], num_heads, num_groups
        ),
        "self_attention.linear_proj.weight": hf[attn + "o_proj.weight"],
        "pre_mlp_layernorm.weight": hf["post_attention_layernorm.weight"],
        "mlp.linear_fc1.weight": torch.cat([hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]], dim=0),
        "mlp.linear_fc2.weight": hf["mlp.down_proj.weight"],
    }


def megatron_layer_to_hf(meg: Dict[str, torch.Tensor], num_heads: int, num_groups: int) -> Dict[str, torch.Tensor]:
    """Inverse of ``hf_layer_to_megatron``."""
    q_w, k_w, v_w = split_qkv(meg["self_attention.linear_qkv.weight"], num_heads, num_groups)
    q_b, k_b, v_b = split_qkv(meg["self_attention.linear_qkv.bias"], num_heads, num_groups)
    gate, up = meg["mlp.linear_fc1.weight"].chunk(2, dim=0)
    return {
        "input_layernorm.weight": meg["input_layernorm.weight"],
        "self_attn.q_proj.weight": q_w,
        "self_attn.k_proj.weight": k_w,
        "self_attn.v_proj.weight": v_w,
        "self_attn.q_proj.bias": q_b,
        "self_attn.k_proj.bias": k_b,
        "self_attn.v_proj.bias": v_b,
        "self_attn.o_proj.weight": meg["self_attention.linear_proj.weight"],
        "post_attention_layernorm.weight": meg["pre_mlp_layernorm.weight"],
        "mlp.gate_proj.weight": gate.contiguous(),
        "mlp.up_proj.weight": up.contiguous(),
        "mlp.down_proj.weight": meg["mlp.linear_fc2.weight"],
    }


HF_LAYER_NAMES = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
"""Per-layer tensor names of a HF ``Qwen2ForCausalLM`` (after ``model.layers.N.``)."""
