"""The on-disk format of a UALM checkpoint: its folders, and the model description it carries.

**Folders.** A ``--save`` directory holds one ``iter_NNNNNNN`` folder per saved iteration (or a
``release`` folder, written by ``convert_checkpoint import``) and the tracker file
``latest_checkpointed_iteration.txt`` naming the latest one. A save in progress writes
``iter_NNNNNNN.partial`` and renames it when complete (``training.atomic_saves``). Every path
of that layout is spelled here, once.

**Description.** A checkpoint written by the training loop or by ``convert_checkpoint import``
describes its own model::

    {"version": 2, "flavor": "qwen2.5-7b", "arch": {hidden_size, num_layers, ..., audio_encoder_config},
     "params_dtype": "bfloat16", "vocab": <vocab_layout>, "vocab_fingerprint": "3f2c...",
     "codec": {...} | None, "trained_by": ...}

so generation, evaluation, export and post-training rebuild the exact model from the checkpoint
alone: ``--flavor`` becomes optional and, when given, is checked against it. The training loop
puts the description into Megatron's ``args`` (attribute ``ualm_model``), which every Megatron
checkpoint stores; converted checkpoints keep it under the ``ualm`` key of their common state.
The ``vocab`` layout (``megatron_ualm.vocab.vocab_layout``: tokenizer identity,
text_vocab_size, special tokens, K, card) is compared wherever the checkpoint meets data or a
tokenizer. Checkpoints written before descriptions existed are still read: their ``args`` give
the same config.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

import torch

from megatron_ualm.config import FLAVORS, UALMConfig, config_from_megatron_args, make_config
from megatron_ualm.errors import CheckpointError
from megatron_ualm.vocab import check_layouts, layout_fingerprint, vocab_layout

# ---------------------------------------------------------------------------------------------
# Folders.

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
PARTIAL_SUFFIX = ".partial"
_ITERATION = re.compile(r"iter_(\d{7})")


def iteration_folder(iteration: int) -> str:
    """The folder name of an iteration's checkpoint (``iter_0000100``), as Megatron names it."""
    return f"iter_{int(iteration):07d}"


def has_checkpoint(save_dir: Optional[str]) -> bool:
    """Whether ``save_dir`` holds a tracker file (a checkpoint Megatron's ``--load`` resumes)."""
    return bool(save_dir) and os.path.isfile(os.path.join(save_dir, TRACKER))


def read_tracker(save_dir: str) -> Optional[str]:
    """The folder the tracker of ``save_dir`` names (``iter_NNNNNNN`` or ``release``); None when
    there is no tracker or it holds neither an iteration number nor ``release``."""
    path = os.path.join(save_dir, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return RELEASE if text == RELEASE else iteration_folder(int(text)) if text.isdigit() else None


def iterations_in(save_dir: str) -> list[int]:
    """Complete ``iter_NNNNNNN`` folders of a ``--save`` directory, ascending."""
    if not os.path.isdir(save_dir):
        return []
    found = [_ITERATION.fullmatch(d) for d in os.listdir(save_dir)]
    return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(save_dir, m.group(0))))


def has_checkpoints(save_dir: Optional[str]) -> bool:
    """Whether ``save_dir`` holds a tracker or any complete iteration folder."""
    return bool(save_dir) and (has_checkpoint(save_dir) or bool(iterations_in(save_dir)))


def resolve_checkpoint(path: str) -> str:
    """The ``torch_dist`` directory (the one with ``metadata.json``) a user's path means.

    Accepts an iteration / release directory itself, or a ``--save`` root whose tracker file
    names the iteration.

    Raises:
        CheckpointError: the path does not exist, holds no checkpoint, or its tracker names an
            iteration whose folder is missing (the message lists the iterations present and how
            to pick one).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist (give a --save directory or one iter_* folder)")
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        present = iterations_in(path)
        hint = f"; it holds {', '.join(iteration_folder(i) for i in present)}: give one of them" if present else ""
        raise CheckpointError(f"{path} is not a Megatron checkpoint: it has neither {TRACKER} nor metadata.json{hint}")
    sub = read_tracker(path)
    if sub is None:
        with open(tracker) as f:
            text = f.read().strip()
        raise CheckpointError(f"{tracker} holds {text!r}, expected an iteration number or '{RELEASE}'")
    target = os.path.join(path, sub)
    if not os.path.isdir(target):
        raise CheckpointError(missing_iteration_message(path, sub))
    if not os.path.isfile(os.path.join(target, "metadata.json")):
        raise CheckpointError(
            f"{target} is not a torch_dist checkpoint (no metadata.json); convert legacy 'torch' checkpoints "
            "with --ckpt-convert-format torch_dist first")
    return target


def missing_iteration_message(save_dir: str, folder: str) -> str:
    """What to say when the tracker names a folder that is not there."""
    present = iterations_in(save_dir)
    if present:
        choices = ", ".join(str(i) for i in present)
        how = (f"the iterations present are {choices}: resume from one with --ckpt-step N (e.g. --ckpt-step "
               f"{present[-1]}), or write that number into {os.path.join(save_dir, TRACKER)}")
    else:
        how = "no iter_* folder is present: start without --load, or point --load at another directory"
    partial = [d for d in os.listdir(save_dir) if d.endswith(PARTIAL_SUFFIX)]
    extra = f" ({', '.join(sorted(partial))} are unfinished saves)" if partial else ""
    return f"{os.path.join(save_dir, TRACKER)} names {folder}, which is missing from {save_dir}{extra}; {how}"


# ---------------------------------------------------------------------------------------------
# Description.

DESCRIPTION_KEY = "ualm"
"""Key of the description in a converted checkpoint's common state."""
ARGS_ATTRIBUTE = "ualm_model"
"""Attribute of Megatron's ``args`` that carries the description in a training checkpoint."""
DESCRIPTION_VERSION = 2

# The UALMConfig fields that fix the shapes and maths of a checkpoint.
ARCH_FIELDS = (
    "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
    "kv_channels", "vocab_size", "text_vocab_size", "share_embeddings_and_output_weights",
    "rotary_base", "layernorm_epsilon", "max_sequence_length", "num_codebooks", "codebook_size",
    "codec_frame_rate", "audio_encoder_type", "audio_encoder_config", "audio_in_frame_rate",
    "audio_adapter_ffn_hidden_size",
)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_model(config: UALMConfig, flavor: str, tokenizer: Optional[dict] = None, **extra: Any) -> Dict[str, Any]:
    """The description stored with a checkpoint (plain Python types only).

    Args:
        config: the model's config.
        flavor: the flavor it was built from (``hf`` for shapes taken from a HF config).
        tokenizer: ``TextTokenizer.identity()`` of the text tokenizer, None when unknown.
        **extra: further entries (``codec``, ``source``, ``init``, ``trained_by``, ...).
    """
    arch = {f: getattr(config, f) for f in ARCH_FIELDS}
    arch["audio_encoder_config"] = dict(arch["audio_encoder_config"])
    layout = vocab_layout(tokenizer, config.text_vocab_size, config.num_codebooks, config.codebook_size)
    return dict(version=DESCRIPTION_VERSION, flavor=flavor, arch=arch, params_dtype=dtype_name(config.params_dtype),
                vocab=layout, vocab_fingerprint=layout_fingerprint(layout), **extra)


def description_layout(description: Dict[str, Any]) -> dict:
    """The token-id layout a description names (version 1: derived from the architecture)."""
    if description.get("vocab"):
        return description["vocab"]
    arch = description["arch"]
    return vocab_layout(None, arch["text_vocab_size"], arch["num_codebooks"], arch["codebook_size"])


def config_from_description(description: Dict[str, Any], **overrides: Any) -> UALMConfig:
    """Rebuilds the ``UALMConfig`` a description names (run-time fields from ``overrides``)."""
    flavor = description.get("flavor")
    base = flavor if flavor in FLAVORS else "debug"
    fields = dict(description["arch"], params_dtype=DTYPES[description.get("params_dtype", "float32")],
                  transformer_impl="local")
    fields.update(overrides)
    return make_config(base, **fields)


def _description_from_args(args: Any) -> Optional[Dict[str, Any]]:
    """The description a training checkpoint carries in its ``args``, or the one its flags give
    (checkpoints saved before descriptions existed); None for args of another program."""
    stored = getattr(args, ARGS_ATTRIBUTE, None)
    if stored is not None:
        return stored
    flavor = getattr(args, "flavor", None)
    if flavor not in FLAVORS:
        return None
    return describe_model(config_from_megatron_args(args), flavor)


def read_description(path: str) -> Optional[Dict[str, Any]]:
    """The model description of a checkpoint, None when it has none (and no training args).

    Args:
        path: a ``--save`` directory or one ``iter_*`` / ``release`` directory.
    """
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(resolve_checkpoint(path))
    if not isinstance(common, dict):
        return None
    if DESCRIPTION_KEY in common:
        return common[DESCRIPTION_KEY]
    if "args" in common:
        return _description_from_args(common["args"])
    return None


def check_flavor(description: Dict[str, Any], flavor: Optional[str], where: str) -> None:
    """Raises ``CheckpointError`` when a user's ``--flavor`` disagrees with the checkpoint's shapes."""
    if flavor is None or flavor == description.get("flavor"):
        return
    if flavor not in FLAVORS:
        raise CheckpointError(f"unknown flavor {flavor!r}; choose one of {sorted(FLAVORS)} (or omit --flavor: "
                              f"{where} describes its own model)")
    want = make_config(flavor, transformer_impl="local")
    diff = [f"{f} {getattr(want, f)} (flavor) vs {description['arch'][f]} (checkpoint)" for f in ARCH_FIELDS
            if f != "audio_encoder_config" and getattr(want, f) != description["arch"].get(f)]
    if diff:
        raise CheckpointError(f"--flavor {flavor} does not match {where} (flavor {description.get('flavor')!r}): "
                              + ", ".join(diff) + ". Omit --flavor to use the checkpoint's own model")


def config_from_checkpoint(path: str, flavor: Optional[str] = None, **overrides: Any) -> UALMConfig:
    """The model config a checkpoint describes.

    Args:
        path: a ``--save`` directory or one iteration directory.
        flavor: optional; checked against the description. Needed only for checkpoints that
            carry neither a description nor training args (bare ``dist_checkpointing.save`` output).
        **overrides: run-time ``UALMConfig`` fields (parallel sizes, dtype, spec).

    Raises:
        CheckpointError: no description and no flavor, or a flavor that does not match.
    """
    description = read_description(path)
    if description is None:
        if flavor is None:
            raise CheckpointError(f"{path} does not describe its model (no 'ualm' description, no training args): "
                                  "pass --flavor (and the overrides the run used)")
        if flavor not in FLAVORS:
            raise CheckpointError(f"unknown flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
        return make_config(flavor, **{"transformer_impl": "local", **overrides})
    check_flavor(description, flavor, path)
    return config_from_description(description, **overrides)


def check_tokenizer(description: Optional[Dict[str, Any]], tokenizer_identity: Optional[dict], where: str,
                    tokenizer_name: str) -> None:
    """Raises ``VocabMismatch`` when a tokenizer does not belong to a checkpoint's layout."""
    if description is None or tokenizer_identity is None:
        return
    check_layouts(description_layout(description), f"checkpoint {where}", vocab_layout(tokenizer_identity),
                  f"tokenizer {tokenizer_name}")
