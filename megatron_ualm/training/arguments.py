"""Command line of the pretraining entry point: Megatron's flags, a flavor, and UALM's flags.

A flavor expands into the Megatron flags that describe its backbone (layers, widths, RMSNorm,
SwiGLU, QKV bias, RoPE theta, tied or untied head, vocabulary rows). They are placed *before*
the user's flags, so anything given on the command line overrides the flavor, as with
torchtitan's flavors. A run that starts from a checkpoint (``--pretrained-checkpoint``) or
resumes one (``--load``) takes the model the checkpoint describes instead (``base_model``): any
size, any tokenizer, ``hf`` imports included; flags given explicitly are checked against it. ``config.config_from_megatron_args`` turns the parsed namespace into the typed
``UALMConfig`` once, at the entry point; model, data and loss code never read ``get_args()``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_ualm.config import FLAVORS, UALMConfig, default_transformer_impl, make_config

FREEZE_POLICIES = ("full", "alignment")


def model_argv(config: UALMConfig) -> list[str]:
    """The Megatron flags that describe a model's backbone (a flavor's, or a checkpoint's)."""
    c = config
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
        # Data is pre-tokenised; NullTokenizer with the model's row count gives Megatron that
        # row count for its own bookkeeping.
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


def flavor_argv(flavor: str) -> list[str]:
    """The Megatron flags that describe a flavor's backbone."""
    return model_argv(make_config(flavor))


@dataclass(frozen=True)
class BaseModel:
    """Where a training run takes its model from, before the user's flags.

    Attributes:
        flavor: the flavor name (``hf`` for shapes a converted Hugging Face model gave).
        argv: the Megatron flags of its backbone.
        checkpoint: the checkpoint the run starts from or resumes (None: a fresh model).
        description: that checkpoint's model description (None without one).
    """

    flavor: str
    argv: list
    checkpoint: Optional[str] = None
    description: Optional[dict] = None


def _start_flags(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--flavor", "--load", "--pretrained-checkpoint"):
        parser.add_argument(flag, default=None)
    parser.add_argument("--ckpt-step", type=int, default=None)
    known, _ = parser.parse_known_args(argv)
    return known


def base_model(argv: Sequence[str]) -> BaseModel:
    """The model a command line starts from: the checkpoint it resumes (``--load``) or starts
    from (``--pretrained-checkpoint``) when that checkpoint describes its model, else the
    ``--flavor`` (default ``debug``). An explicit ``--flavor`` is checked against the checkpoint.

    Raises:
        ValueError: an unknown flavor, or a ``--pretrained-checkpoint`` that is not there.
        CheckpointError: a ``--flavor`` that does not match the checkpoint.
    """
    from megatron_ualm.checkpoint_format import (check_flavor, config_from_description, has_checkpoints,
                                                 read_description)
    from megatron_ualm.training.checks import checkpoint_to_load

    flags = _start_flags(argv)
    start = flags.pretrained_checkpoint
    if start and not os.path.isdir(start):
        raise ValueError(f"--pretrained-checkpoint {start} does not exist; give the --save directory of a run (or one "
                         "of its iter_* folders) or the output of tools/convert_checkpoint.py import")
    if start and not has_checkpoints(start) and not os.path.isfile(os.path.join(start, "metadata.json")):
        raise ValueError(f"--pretrained-checkpoint {start} holds no checkpoint (no latest_checkpointed_iteration.txt, "
                         "no iter_* folder); give the --save directory of a run or a converted checkpoint")
    path = checkpoint_to_load(flags)
    description = read_description(path) if path else None
    if description is None:
        flavor = flags.flavor or "debug"
        if flavor not in FLAVORS:
            raise ValueError(f"--flavor {flavor!r} is not one of {sorted(FLAVORS)}")
        return BaseModel(flavor, flavor_argv(flavor), path)
    check_flavor(description, flags.flavor, path)
    return BaseModel(description["flavor"], model_argv(config_from_description(description)), path, description)


def add_ualm_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds UALM's flags to Megatron's parser."""
    g = parser.add_argument_group("UALM")
    g.add_argument("--flavor", default=None,
                   help=f"model shapes, one of {', '.join(sorted(FLAVORS))} (default debug); backbone flags are "
                        "derived from it, explicit flags win. A run that starts from or resumes a checkpoint takes "
                        "the checkpoint's model: --flavor is then optional and checked against it")
    g.add_argument("--text-vocab-size", type=int, default=None,
                   help="text tokenizer ids (default: the flavor's, or the starting checkpoint's)")
    g.add_argument("--num-codebooks", type=int, default=None,
                   help="K, codec codebooks predicted per frame (default: the flavor's, or the checkpoint's)")
    g.add_argument("--codebook-size", type=int, default=None,
                   help="codes per codebook (default: the flavor's, or the checkpoint's)")
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
