"""Supervised fine-tuning (SFT) of UALM on Megatron's training loop.

The loop, flags, checkpoints and logging are pretraining's (``megatron_ualm.training.loop``);
what makes it SFT is where it starts and what it reads:

- it starts from a checkpoint: ``--pretrained-checkpoint CKPT`` (a converted or pretrained
  checkpoint; Megatron loads its weights only, iteration 0, fresh optimizer) with ``--load``
  and ``--save`` on the run's own directory, so the same command resumes after a kill;
- it reads a blend of ``chat`` shards (``tools/preprocess_chat.py``, then
  ``tools/build_blend.py``; other families may be mixed in): loss only where the records put
  it (assistant turns by default), CFG condition dropout on the user text before audio-out
  replies (``--cfg-condition-dropout``), rows packed as in pretraining;
- ``--freeze`` chooses what trains, as in pretraining.

The UALM-Gen *adaptation* step is an SFT run on the winning generations the pair builder
writes. Example::

    torchrun --nproc-per-node 8 -m megatron_ualm.finetune --flavor qwen2.5-7b \\
        --tensor-model-parallel-size 4 --sequence-parallel --bf16 --use-distributed-optimizer \\
        --pretrained-checkpoint /ckpt/ualm-7b --load /ckpt/sft --save /ckpt/sft \\
        --blend-file sft_blend.json --seq-length 4096 --micro-batch-size 1 --global-batch-size 128 \\
        --train-iters 5000 --lr 1e-5 --lr-decay-style cosine --save-interval 500 --log-interval 10
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence


def check_data(args: argparse.Namespace) -> None:
    """A starting checkpoint and a readable blend without DPO pairs."""
    from megatron_ualm.checkpoint_format import has_checkpoint
    from megatron_ualm.training import checks

    checks.check_blend(args)
    if not any(has_checkpoint(p) for p in (args.pretrained_checkpoint, args.load)):
        given = args.pretrained_checkpoint or args.load
        raise ValueError(("no checkpoint in " + given + "; " if given else "") +
                         "fine-tuning starts from a checkpoint: give --pretrained-checkpoint CKPT (a converted or "
                         "pretrained checkpoint) and --load/--save on the run's directory (the same command resumes)")
    if args.blend_file:
        from megatron_ualm.data.blend import load_plan

        plan = load_plan(args.blend_file)
        pairs = [p for p, f in zip(plan.shards, plan.families) if f == "preference"]
        if pairs:
            raise ValueError(f"--blend-file {args.blend_file} holds preference pairs ({pairs[0]}); train DPO on them "
                             "with python -m megatron_ualm.dpo")


def entry():
    """The ``TrainingEntry`` of this program (heavy imports here, after the warning summary is on)."""
    from megatron_ualm.evaluation.during_training import AudioEvalDuringTraining
    from megatron_ualm.training import loop, providers

    return loop.TrainingEntry("finetune", providers.datasets_provider, providers.forward_step, check_data=check_data,
                              extensions=(AudioEvalDuringTraining,))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line and runs SFT on Megatron's loop."""
    from megatron_ualm.training.start import run_entry

    run_entry(entry, argv)


if __name__ == "__main__":
    main()
