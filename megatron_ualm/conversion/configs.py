"""Configs across the boundary: HF ``Qwen2Config`` / encoder configs <-> ``UALMConfig``.

The ``ualm`` description a checkpoint carries (flavor, architecture, vocabulary layout, codec) is
defined in ``megatron_ualm.checkpoint_format``; this module maps HF configs onto it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from megatron_ualm.config import FLAVORS, UALMConfig, make_config
from megatron_ualm.conversion.hf_io import ConversionError, read_json
from megatron_ualm.checkpoint_format import dtype_name

# Fields compared when matching a HF config to a flavor.
_MATCHED = (
    "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "vocab_size", "share_embeddings_and_output_weights",
)

def hf_arch(hf_dir: str) -> Dict[str, Any]:
    """The backbone shapes of a HF Qwen2 directory, in ``UALMConfig`` field names.

    Raises:
        ConversionError: ``config.json`` is missing or is not a Qwen2 causal LM.
    """
    path = os.path.join(hf_dir, "config.json")
    hf = read_json(path)
    if hf.get("model_type") != "qwen2":
        raise ConversionError(
            f"{path}: model_type={hf.get('model_type')!r}, expected 'qwen2' (a Qwen2 / Qwen2.5 Qwen2ForCausalLM)"
        )
    rope = hf.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConversionError(f"{path}: only plain RoPE is supported, got rope_parameters={rope}, rope_scaling={hf.get('rope_scaling')}")
    heads = hf["num_attention_heads"]
    return dict(
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads", heads),
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        rotary_base=float(rope_theta),
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        max_sequence_length=int(hf.get("max_position_embeddings", 4096)),
        _dtype=hf.get("dtype") or hf.get("torch_dtype") or "float32",
    )


def _flavor_fields(name: str) -> Dict[str, Any]:
    cfg = make_config(name, transformer_impl="local")
    return {f: getattr(cfg, f) for f in _MATCHED}


def _diff(arch: Dict[str, Any], want: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
    return {f: (want[f], arch[f]) for f in _MATCHED if want[f] != arch[f]}


def resolve_flavor(arch: Dict[str, Any], flavor: str, source: str) -> str:
    """Checks (or, for ``auto``, finds) the flavor whose backbone shapes equal the HF config's.

    ``hf`` takes every shape from the HF config (fine-tunes with other shapes, tests).

    Raises:
        ConversionError: no flavor matches, or the named flavor differs (expected vs got per field).
    """
    if flavor == "hf":
        return flavor
    if flavor == "auto":
        for name in FLAVORS:
            if not _diff(arch, _flavor_fields(name)):
                return name
        closest = min(FLAVORS, key=lambda n: len(_diff(arch, _flavor_fields(n))))
        raise ConversionError(
            f"{source} matches no UALM flavor; closest is {closest!r}, which differs in "
            + ", ".join(f"{f} (flavor {w}, checkpoint {g})" for f, (w, g) in _diff(arch, _flavor_fields(closest)).items())
            + ". Name the flavor explicitly or use --flavor hf to take the shapes from config.json"
        )
    if flavor not in FLAVORS:
        raise ConversionError(f"unknown flavor {flavor!r}; choose auto, hf or one of {sorted(FLAVORS)}")
    diff = _diff(arch, _flavor_fields(flavor))
    if diff:
        raise ConversionError(
            f"{source} does not match flavor {flavor!r}: "
            + ", ".join(f"{f} expected {w}, got {g}" for f, (w, g) in diff.items())
        )
    return flavor


def encoder_info(encoder_dir: str) -> Tuple[str, Dict[str, Any], str]:
    """(UALM encoder type, encoder config kwargs, weight-name prefix) of an encoder directory.

    Accepts a bare encoder (``Qwen2AudioEncoder`` / ``AudioFlamingo3Encoder`` saved alone), a full
    Qwen2-Audio / Audio Flamingo 3 model (its ``audio_config``, weights under ``audio_tower.``)
    or a Whisper model (its encoder, weights under ``model.encoder.`` or ``encoder.``).
    """
    path = os.path.join(encoder_dir, "config.json")
    hf = read_json(path)
    kind = hf.get("model_type")
    if "audio_config" in hf and kind in ("qwen2_audio", "audioflamingo3"):
        sub = dict(hf["audio_config"])
        return ("qwen2_audio" if kind == "qwen2_audio" else "audioflamingo3"), _clean(sub), "audio_tower."
    if kind == "qwen2_audio_encoder":
        return "qwen2_audio", _clean(hf), ""
    if kind == "audioflamingo3_encoder":
        return "audioflamingo3", _clean(hf), ""
    if kind == "whisper":
        return "whisper", _clean(hf), "model.encoder."
    raise ConversionError(
        f"{path}: model_type={kind!r} is not an audio encoder UALM knows; expected qwen2_audio_encoder, "
        "audioflamingo3_encoder, whisper, or a qwen2_audio / audioflamingo3 model"
    )


def _clean(cfg: Dict[str, Any]) -> Dict[str, Any]:
    drop = {"model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"}
    return {k: v for k, v in cfg.items() if k not in drop}


def build_config(flavor: str, arch: Dict[str, Any], overrides: Dict[str, Any]) -> UALMConfig:
    """The ``UALMConfig`` of a conversion: a flavor (or, for ``hf``, the HF shapes) plus overrides."""
    base = "debug" if flavor == "hf" else flavor
    fields = {}
    if flavor == "hf":
        fields.update({k: v for k, v in arch.items() if not k.startswith("_")})
        # A HF config says nothing about the audio side: keep the debug flavor's unless overridden
        # (a tiny encoder), which tests and fine-tunes with custom shapes set explicitly.
    else:
        fields.update(rotary_base=arch["rotary_base"], layernorm_epsilon=arch["layernorm_epsilon"])
    fields.update(overrides)
    fields.setdefault("transformer_impl", "local")
    try:
        return make_config(base, **fields)
    except ValueError as e:
        raise ConversionError(f"invalid UALM config for flavor {flavor!r}: {e}") from None


def check_parallel(config: UALMConfig, tp: int, pp: int) -> None:
    """Raises when the model cannot be split ``tp`` x ``pp`` ways (what to change is in the message)."""
    checks = [
        ("num_attention_heads", config.num_attention_heads, tp),
        ("num_query_groups", config.num_query_groups, tp),
        ("ffn_hidden_size", config.ffn_hidden_size, tp),
        ("vocab_size", config.vocab_size, tp),
        ("codebook_size", config.codebook_size, tp),
        ("num_layers", config.num_layers, pp),
    ]
    for name, value, size in checks:
        if value % size:
            which = "tensor_model_parallel_size" if size == tp and name != "num_layers" else "pipeline_model_parallel_size"
            raise ConversionError(f"{name}={value} is not divisible by {which}={size}; choose a size that divides it")


def qwen2_config_dict(config: UALMConfig, dtype: torch.dtype) -> Dict[str, Any]:
    """``config.json`` of the HF ``Qwen2ForCausalLM`` holding the text part of ``config``."""
    from transformers import Qwen2Config

    hf = Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        head_dim=config.kv_channels,
        hidden_act="silu",
        max_position_embeddings=config.max_sequence_length,
        rms_norm_eps=config.layernorm_epsilon,
        rope_theta=config.rotary_base,
        tie_word_embeddings=config.share_embeddings_and_output_weights,
        use_sliding_window=False,
        attention_dropout=0.0,
    )
    hf.architectures = ["Qwen2ForCausalLM"]
    out = hf.to_dict()
    out["dtype"] = dtype_name(dtype)
    return out


def encoder_config_dict(config: UALMConfig) -> Optional[Dict[str, Any]]:
    """``config.json`` of the audio encoder as a standalone HF model (None without an encoder)."""
    if config.audio_encoder_type is None:
        return None
    from megatron_ualm.models.encoder import _encoder_classes

    model_cls, config_cls, _ = _encoder_classes(config.audio_encoder_type)
    cfg = config_cls(**config.audio_encoder_config)
    cfg.architectures = [model_cls.__name__]
    return cfg.to_dict()


