"""Command line of the pretraining entry point: Megatron's flags, a flavor, and UALM's flags.

A flavor expands into the Megatron flags that describe its backbone (layers, widths, RMSNorm,
SwiGLU, QKV bias, RoPE theta, tied or untied head, vocabulary rows). They are placed *before*
the user's flags, so anything given on the command line overrides the flavor, as with
torchtitan's flavors. ``config.config_from_megatron_args`` turns the parsed namespace into the typed
``UALMConfig`` once, at the entry point; model, data and loss code never read ``get_args()``.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from megatron_ualm.config import FLAVORS, default_transformer_impl, make_config

FREEZE_POLICIES = ("full", "alignment")


def flavor_of(argv: Sequence[str]) -> str:
    """The ``--flavor`` of a command line (default ``debug``).

    Raises:
        ValueError: an unknown flavor.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--flavor", default="debug")
    known, _ = parser.parse_known_args(argv)
    if known.flavor not in FLAVORS:
        raise ValueError(f"--flavor {known.flavor!r} is not one of {sorted(FLAVORS)}")
    return known.flavor


def flavor_argv(flavor: str) -> list[str]:
    """The Megatron flags that describe a flavor's backbone."""
    c = make_config(flavor)
    argv = [
        "--num-layers", str(c.num_layers),
        "--hidden-size", str(c.hidden_size),
        "--ffn-hidden-size", str(c.ffn_hidden_size),
        "--num-attention-heads", str(c.num_attention_heads),
        "--group-query-attention", "--num-query-groups", str(c.num_query_groups),
        "--kv-channels", str(c.kv_channels),
        "--normalization", "RMSNorm", "--norm-epsilon", str(c.layernorm_epsilon),
        "--swiglu", "--disable-bias-linear", "--add-qkv-bias",
        "--position-embedding-type", "rope", "--rotary-base", str(int(c.rotary_base)),
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--max-position-embeddings", str(c.max_sequence_length),
        # Data is pre-tokenised; NullTokenizer with the flavor's row count gives Megatron the
        # flavor's row count for its own bookkeeping.
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(c.vocab_size),
        "--make-vocab-size-divisible-by", "1",
        "--calculate-per-token-loss",
        "--dataloader-type", "external",
        "--transformer-impl", default_transformer_impl(),
        "--ckpt-format", "torch_dist",
        "--log-throughput",
        # Run defaults Megatron leaves unset; the command line overrides them.
        "--eval-interval", "1000",
    ]
    if not c.share_embeddings_and_output_weights:
        argv.append("--untie-embeddings-and-output-weights")
    return argv


def add_ualm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds UALM's flags to Megatron's parser."""
    g = parser.add_argument_group("UALM")
    g.add_argument("--flavor", default="debug", choices=sorted(FLAVORS),
                   help="model shapes (backbone flags are derived from it; explicit flags win)")
    g.add_argument("--blend-file", default=None,
                   help="blend JSON written by tools/build_blend.py (the training data)")
    g.add_argument("--synthetic-data", action="store_true",
                   help="train on generated mixed-family samples (smoke runs, throughput benchmarks)")
    g.add_argument("--text-loss-weight", type=float, default=1.0, help="weight of the stream-0 loss")
    g.add_argument("--codebook-loss-weights", type=float, nargs="+", default=None,
                   help="one weight per codebook (default: all 1.0)")
    g.add_argument("--cfg-condition-dropout", type=float, default=0.05,
                   help="probability that a generation sample's caption is replaced by an empty condition")
    g.add_argument("--freeze", choices=FREEZE_POLICIES, default="full",
                   help="full: train everything but the audio encoder; alignment: train only the "
                        "adapter and the codebook embeddings and heads (modality alignment stage)")
    g.add_argument("--audio-encoder-type", default=None, help="override the flavor's encoder type")
    g.add_argument("--audio-encoder-path", default=None,
                   help="local directory of pretrained encoder weights (save_pretrained layout)")
    g.add_argument("--no-audio-encoder", action="store_true", help="build the model without audio input")
    g.add_argument("--loss-plot", default=None, help="write a PNG of the loss curves here at the end")
    return parser
