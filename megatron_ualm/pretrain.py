"""Pretrain UALM on Megatron's training loop (``megatron.training.pretrain``).

Megatron's flags work unchanged (parallel sizes, ``--sequence-parallel``,
``--use-distributed-optimizer``, ``--bf16``, ``--fp8-format hybrid``, ``--save/--load``, logging
intervals, ...); ``--flavor`` supplies the backbone flags, UALM's own flags are listed under
"UALM" in ``--help``. On a machine without CUDA the CPU shims are installed and gloo is used,
so the loop that runs on H100s is the loop tested in CI. Examples::

    torchrun --nproc-per-node 8 -m megatron_ualm.pretrain --flavor qwen2.5-7b \\
        --tensor-model-parallel-size 4 --sequence-parallel --bf16 --fp8-format hybrid \\
        --use-distributed-optimizer --blend-file blend.json --seq-length 4096 \\
        --micro-batch-size 1 --global-batch-size 256 --train-iters 100000 --lr 2e-5 \\
        --save ckpt --load ckpt --save-interval 1000 --log-interval 10 --tensorboard-dir tb

    python -m megatron_ualm.pretrain --flavor debug --synthetic-data --train-iters 20 \\
        --micro-batch-size 2 --global-batch-size 4 --seq-length 128 --lr 1e-3
"""

from __future__ import annotations

from typing import Optional, Sequence


def entry():
    """The ``TrainingEntry`` of this program (heavy imports here, after the warning summary is on)."""
    from megatron_ualm.evaluation.during_training import AudioEvalDuringTraining
    from megatron_ualm.training import loop, providers

    return loop.TrainingEntry("pretrain", providers.datasets_provider, providers.forward_step,
                              extensions=(AudioEvalDuringTraining,))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line and runs Megatron's pretraining loop on UALM."""
    from megatron_ualm.training.start import run_entry

    run_entry(entry, argv)


if __name__ == "__main__":
    main()
