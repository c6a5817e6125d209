"""UALM configuration: Megatron's ``TransformerConfig`` plus the audio fields, and flavors.

A flavor is a named set of shapes (``debug``, ``qwen2.5-0.5b`` ... ``qwen2.5-7b``).
``make_config(flavor, **overrides)`` builds a validated ``UALMConfig``; overrides carry the
run's choices (parallel sizes, dtype, spec, FP8) and any shape change for experiments.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

# Number of special-token rows reserved after the tokenizer's vocabulary (see vocab.py).
NUM_RESERVED_SPECIAL_TOKENS = 32

AUDIO_ENCODER_TYPES = ("qwen2_audio", "audioflamingo3", "whisper")


@dataclass
class UALMConfig(TransformerConfig):
    """Megatron ``TransformerConfig`` with the fields UALM adds on top of the backbone.

    Stream 0 (text + specials) and the K codebook streams are described here; the token-id
    layout itself is owned by ``megatron_ualm.vocab.UALMVocab``.
    """

    # Backbone fields that GPTModel takes as constructor arguments; a flavor must fix them.
    text_vocab_size: int = 0
    """Size of the text tokenizer's vocabulary; special tokens are placed right after it."""

    vocab_size: int = 0
    """Rows of the stream-0 embedding and text head (text + specials + padding)."""

    max_sequence_length: int = 4096
    """Longest sequence the model is built for (RoPE table size)."""

    rotary_base: float = 1_000_000.0
    """RoPE theta (1e6 for all Qwen2.5 sizes)."""

    share_embeddings_and_output_weights: bool = False
    """Tie the text head to the stream-0 embedding (Qwen2.5 <= 3B are tied, 7B is not)."""

    # Audio out: discrete codec tokens.
    num_codebooks: int = 8
    """K, the number of RVQ codebooks predicted per codec frame."""

    codebook_size: int = 1024
    """card, the number of codes in each codebook."""

    codec_frame_rate: int = 50
    """Codec frames per second (X-Codec: 16 kHz / hop 320 = 50 Hz)."""

    # Audio in: continuous features from a frozen encoder.
    audio_encoder_type: Optional[str] = "qwen2_audio"
    """Encoder architecture from ``transformers`` (one of AUDIO_ENCODER_TYPES), None for none."""

    audio_encoder_config: dict = field(default_factory=dict)
    """Keyword overrides for the encoder's ``transformers`` config (empty: library defaults)."""

    audio_encoder_path: Optional[str] = None
    """Local directory with the encoder's pretrained weights; None keeps a random init."""

    audio_in_frame_rate: int = 25
    """Frames per second the adapter emits, one audio-in placeholder token per frame."""

    audio_adapter_ffn_hidden_size: Optional[int] = None
    """Hidden width of the 2-layer MLP adapter (None: the LM hidden size)."""

    # Losses.
    text_loss_weight: float = 1.0
    """Weight of the stream-0 (text) cross-entropy."""

    codebook_loss_weights: Optional[tuple] = None
    """Per-codebook cross-entropy weights, length K (None: all 1.0)."""

    cfg_condition_dropout: float = 0.05
    """Probability that a generation sample's condition is replaced by an empty one."""

    def __post_init__(self) -> None:
        super().__post_init__()
        tp = self.tensor_model_parallel_size
        K = self.num_codebooks
        if self.text_vocab_size <= 0:
            raise ValueError("text_vocab_size must be the tokenizer's vocabulary size (> 0)")
        needed = self.text_vocab_size + NUM_RESERVED_SPECIAL_TOKENS
        if self.vocab_size < needed:
            raise ValueError(
                f"vocab_size={self.vocab_size} leaves no room for the special tokens: it must be "
                f">= text_vocab_size + {NUM_RESERVED_SPECIAL_TOKENS} = {needed}"
            )
        if self.vocab_size % tp:
            raise ValueError(
                f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size="
                f"{tp}: pad vocab_size to a multiple of {tp} or choose a TP size that divides it"
            )
        if self.codebook_size % tp:
            raise ValueError(
                f"codebook_size={self.codebook_size} is not divisible by "
                f"tensor_model_parallel_size={tp}; the RVQ heads are split over TP ranks"
            )
        if K < 1:
            raise ValueError(f"num_codebooks must be >= 1, got {K}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of num_query_groups={groups} "
                "(grouped-query attention shares each key/value head among equally many query heads)"
            )
        if self.codebook_loss_weights is None:
            self.codebook_loss_weights = (1.0,) * K
        self.codebook_loss_weights = tuple(float(w) for w in self.codebook_loss_weights)
        if len(self.codebook_loss_weights) != K:
            raise ValueError(
                f"codebook_loss_weights has {len(self.codebook_loss_weights)} entries; "
                f"give one weight per codebook (num_codebooks={K})"
            )
        if not 0.0 <= self.cfg_condition_dropout < 1.0:
            raise ValueError(
                f"cfg_condition_dropout={self.cfg_condition_dropout} must be in [0, 1)"
            )
        if self.audio_encoder_type is not None and self.audio_encoder_type not in (
            AUDIO_ENCODER_TYPES
        ):
            raise ValueError(
                f"audio_encoder_type={self.audio_encoder_type!r}: choose one of "
                f"{AUDIO_ENCODER_TYPES} or None"
            )
        if self.audio_encoder_path is not None and not os.path.isfile(os.path.join(self.audio_encoder_path, "config.json")):
            raise ValueError(
                f"audio_encoder_path={self.audio_encoder_path}: no encoder there (expected a local directory with "
                "config.json and weights, as written by save_pretrained or convert_checkpoint export's audio_encoder/)"
            )
        if self.audio_adapter_ffn_hidden_size is None:
            self.audio_adapter_ffn_hidden_size = self.hidden_size
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ValueError(
                f"transformer_impl={self.transformer_impl!r}: UALM supports 'local' (CPU, tests) "
                "and 'transformer_engine' (GPU)"
            )
        if self.transformer_impl == "transformer_engine" and not te_available():
            raise ValueError(
                "transformer_impl='transformer_engine' needs Transformer Engine and a CUDA "
                "device; use transformer_impl='local' on CPU"
            )
        if self.fp8:
            if self.transformer_impl != "transformer_engine":
                raise ValueError(
                    "fp8 needs Transformer Engine: set transformer_impl='transformer_engine'"
                )
            for name in ("hidden_size", "ffn_hidden_size", "kv_channels"):
                if getattr(self, name) % 16:
                    raise ValueError(
                        f"fp8 GEMMs need dimensions divisible by 16, but {name}="
                        f"{getattr(self, name)}; run this flavor in bf16 or change its shape"
                    )


def _qwen25(hidden, layers, heads, kv_heads, ffn, vocab, tied) -> dict:
    return dict(
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=ffn,
        kv_channels=hidden // heads,
        vocab_size=vocab,
        text_vocab_size=151665,
        share_embeddings_and_output_weights=tied,
    )


# Architecture shared by every flavor: the Qwen2.5 block.
_QWEN_BLOCK = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    add_qkv_bias=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.02,
    rotary_base=1_000_000.0,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
)

# AF-Whisper encoder shapes (Qwen2-Audio style encoder; 128 mels, 30 s windows, 25 Hz out).
_AF_WHISPER = dict(
    num_mel_bins=128,
    encoder_layers=32,
    encoder_attention_heads=20,
    encoder_ffn_dim=5120,
    d_model=1280,
    max_source_positions=1500,
)

FLAVORS: dict[str, dict[str, Any]] = {
    # Tiny and fast on 2 CPU cores; 4 layers so PP=2 and PP=4 split it evenly.
    "debug": dict(
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        kv_channels=16,
        text_vocab_size=224,
        vocab_size=256,
        share_embeddings_and_output_weights=False,
        codebook_size=64,
        max_sequence_length=512,
        audio_encoder_config=dict(
            num_mel_bins=16,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            d_model=32,
            max_source_positions=100,
        ),
        audio_adapter_ffn_hidden_size=64,
    ),
    "qwen2.5-0.5b": dict(_qwen25(896, 24, 14, 2, 4864, 151936, True), audio_encoder_config=_AF_WHISPER),
    "qwen2.5-1.5b": dict(_qwen25(1536, 28, 12, 2, 8960, 151936, True), audio_encoder_config=_AF_WHISPER),
    "qwen2.5-3b": dict(_qwen25(2048, 36, 16, 2, 11008, 151936, True), audio_encoder_config=_AF_WHISPER),
    "qwen2.5-7b": dict(_qwen25(3584, 28, 28, 4, 18944, 152064, False), audio_encoder_config=_AF_WHISPER),
}


def te_available() -> bool:
    """True when Transformer Engine imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def default_transformer_impl() -> str:
    """``transformer_engine`` where TE can run (GPU), else ``local``."""
    return "transformer_engine" if te_available() else "local"


def make_config(flavor: str, **overrides: Any) -> UALMConfig:
    """Builds the validated config of a flavor, with run-specific overrides.

    Args:
        flavor: one of ``FLAVORS`` (``debug``, ``qwen2.5-0.5b``, ``qwen2.5-1.5b``,
            ``qwen2.5-3b``, ``qwen2.5-7b``).
        **overrides: any ``UALMConfig`` field, e.g. ``tensor_model_parallel_size=2``,
            ``params_dtype=torch.bfloat16``, ``transformer_impl="transformer_engine"``.

    Returns:
        The ``UALMConfig``; ``__post_init__`` has rejected bad combinations.
    """
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
    known = {f.name for f in dataclasses.fields(UALMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown UALMConfig field(s) {unknown} in overrides")
    kwargs = {**_QWEN_BLOCK, **FLAVORS[flavor], **overrides}
    kwargs.setdefault("transformer_impl", default_transformer_impl())
    if kwargs.get("bf16") and "params_dtype" not in overrides:
        kwargs["params_dtype"] = torch.bfloat16
    if kwargs.get("pipeline_model_parallel_size", 1) > 1 and kwargs.get("pipeline_dtype") is None:
        # Stages exchange activations in the parameters' dtype unless told otherwise.
        kwargs["pipeline_dtype"] = kwargs.get("params_dtype", torch.float32)
    return UALMConfig(**kwargs)


def config_from_megatron_args(args: Any) -> UALMConfig:
    """The model config of a run: Megatron's translation of its parsed flags plus the audio and
    vocabulary fields of the model it starts from (``args.ualm_base_model``, the description of
    its starting checkpoint, else the flavor) and UALM's own flags (``--text-loss-weight``,
    ``--text-vocab-size``, ``--no-audio-encoder``, ...).

    Called once, at the entry point (and for checkpoints whose stored ``args`` are all they
    have); model, data and loss code receive the typed config, never ``get_args()``.

    Args:
        args: a namespace parsed by Megatron's parser with UALM's flags added.
    """
    from megatron.training.arguments import core_transformer_config_from_args

    base_description = getattr(args, "ualm_base_model", None)
    if base_description:
        base = dict(base_description["arch"])
        flavor = base_description.get("flavor")
        flavor = flavor if flavor in FLAVORS else "debug"
    else:
        flavor = args.flavor or "debug"
        base = FLAVORS[flavor]
    base_fields = {k: base[k] for k in _BASE_FIELDS if k in base}
    core = core_transformer_config_from_args(args)
    overrides = {f.name: getattr(core, f.name) for f in dataclasses.fields(TransformerConfig) if f.init}
    overrides.update(base_fields)
    overrides.update(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        rotary_base=float(args.rotary_base),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        text_loss_weight=args.text_loss_weight,
        codebook_loss_weights=tuple(args.codebook_loss_weights) if args.codebook_loss_weights else None,
        cfg_condition_dropout=args.cfg_condition_dropout,
    )
    for flag in ("text_vocab_size", "num_codebooks", "codebook_size"):
        if getattr(args, flag, None) is not None:
            overrides[flag] = getattr(args, flag)
    if args.no_audio_encoder:
        overrides["audio_encoder_type"] = None
    elif args.audio_encoder_type:
        overrides["audio_encoder_type"] = args.audio_encoder_type
    if args.audio_encoder_path:
        overrides["audio_encoder_path"] = args.audio_encoder_path
    return make_config(flavor, **overrides)


# The fields a run takes from the model it starts from (a flavor or a checkpoint's description)
# because no Megatron flag carries them.
_BASE_FIELDS = ("text_vocab_size", "num_codebooks", "codebook_size", "codec_frame_rate", "audio_encoder_type",
                "audio_encoder_config", "audio_in_frame_rate", "audio_adapter_ffn_hidden_size")
