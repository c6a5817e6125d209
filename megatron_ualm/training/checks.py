"""Checks every training entry point makes before anything is built.

Each raises ``ValueError`` / ``OSError`` / ``CheckpointError`` / ``VocabMismatch`` with one line
that names the flag or file and says what to do; ``training.loop`` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from megatron_ualm.checkpoint_format import (ARCH_FIELDS, description_layout, has_checkpoint,
                                             has_checkpoints, iteration_folder, missing_iteration_message,
                                             read_description, read_tracker)
from megatron_ualm.errors import CheckpointError


def blend_layout(args: argparse.Namespace) -> Optional[dict]:
    """The token-id layout of ``--blend-file``'s shards (None for synthetic data)."""
    if not getattr(args, "blend_file", None):
        return None
    from megatron_ualm.data.blend import load_plan

    return load_plan(args.blend_file).vocab_layout


def check_blend(args: argparse.Namespace) -> None:
    """The blend file and its shards are readable and consistent (cheap: sizes, index headers,
    sidecar counts), so a truncated shard stops the run here, naming the file."""
    if getattr(args, "synthetic_data", False):
        return
    if not getattr(args, "blend_file", None):
        raise ValueError("give the training data: --blend-file (tools/build_blend.py) or --synthetic-data")
    from megatron_ualm.data.blend import check_shards, load_plan

    check_shards(load_plan(args.blend_file))


def check_data_fits_model(args: argparse.Namespace, run_config) -> None:
    """Every shard of ``--blend-file`` can train this run's model (text vocabulary, codebooks,
    audio in only where the model has an encoder), checked from the sidecars before the model and
    the datasets are built."""
    if getattr(args, "synthetic_data", False) or not getattr(args, "blend_file", None):
        return
    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.data.blend import load_plan
    from megatron_ualm.data.dataset import check_fits_model
    from megatron_ualm.data.shards import read_sidecar
    from megatron_ualm.vocab import UALMVocab

    vocab = UALMVocab.from_config(run_config)
    audio_in = AudioInConfig.from_model_config(run_config) if run_config.audio_encoder_type else None
    plan = load_plan(args.blend_file)
    for path, family in zip(plan.shards, plan.families):
        check_fits_model(read_sidecar(path), path, vocab, audio_in, reads_pairs=family == "preference")


def check_schedule(args: argparse.Namespace) -> None:
    """The run has a length (Megatron raises a bare exception only once the model is built)."""
    if getattr(args, "train_iters", None) is None and getattr(args, "train_samples", None) is None:
        raise ValueError("give the run's length: --train-iters N (optimizer steps), or --train-samples N")


def check_resumable(args: argparse.Namespace) -> None:
    """Refuses ``--finetune`` on a run that resumes from its own directory.

    Megatron's ``--finetune`` loads weights only and restarts at iteration 0 with a fresh
    optimizer and data position, every time: a resumed run would silently start over.
    ``--pretrained-checkpoint`` already starts from other weights while ``--load`` holds no
    checkpoint.
    """
    if args.finetune and has_checkpoint(args.load) and args.save and (
            os.path.abspath(args.load) == os.path.abspath(args.save)):
        raise ValueError(f"--finetune with --load {args.load} (this run's --save) would restart at iteration 0 on every "
                         "resume; drop --finetune: --pretrained-checkpoint starts the run, --load resumes it")


def check_directories(args: argparse.Namespace) -> None:
    """``--save`` holds no other run's checkpoints; the checkpoint ``--load`` names exists."""
    if args.save and has_checkpoints(args.save) and os.path.abspath(args.load or "") != os.path.abspath(args.save):
        raise CheckpointError(
            f"--save {args.save} already holds checkpoints of another run; resume it with --load {args.save}, or "
            "choose a new --save directory")
    if has_checkpoint(args.load):
        step = getattr(args, "ckpt_step", None)
        folder = read_tracker(args.load) if step is None else iteration_folder(step)
        if folder is None or not os.path.isdir(os.path.join(args.load, folder)):
            raise CheckpointError(missing_iteration_message(args.load, folder or "no iteration"))


def checkpoint_to_load(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint directory Megatron will load (``--load``, else ``--pretrained-checkpoint``)."""
    for path in (args.load, getattr(args, "pretrained_checkpoint", None)):
        if has_checkpoint(path):
            if path == args.load and getattr(args, "ckpt_step", None) is not None:
                return os.path.join(path, iteration_folder(args.ckpt_step))
            return path
    return None


def check_checkpoint(args: argparse.Namespace, run_config, run_layout: Optional[dict]) -> Optional[dict]:
    """The description of the checkpoint to load, checked against this run (architecture, vocabulary).

    Returns:
        The description, or None when nothing is loaded or the checkpoint has none.
    """
    from megatron_ualm.vocab import check_layouts, vocab_layout

    path = checkpoint_to_load(args)
    if path is None:
        return None
    description = read_description(path)
    if description is None:
        return None
    ours = {f: getattr(run_config, f) for f in ARCH_FIELDS}
    diff = [f"{f} {description['arch'][f]!r} (checkpoint) vs {ours[f]!r} (this run)" for f in ARCH_FIELDS
            if f in description["arch"] and description["arch"][f] != ours[f]]
    if diff:
        raise CheckpointError(f"checkpoint {path} was trained with another model than this run's flags give: "
                              + "; ".join(diff) + ". The run takes its model from the checkpoint: drop the flags "
                              "that change it")
    run = vocab_layout(None, run_config.text_vocab_size, run_config.num_codebooks, run_config.codebook_size)
    if run_layout is not None:
        run = dict(run, tokenizer=run_layout.get("tokenizer"))
    check_layouts(description_layout(description), f"checkpoint {path}", run,
                  f"this run ({args.blend_file or 'its data'})")
    return description

