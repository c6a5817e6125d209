"""Direct preference optimisation (DPO) of UALM on Megatron's training loop.

Sigmoid DPO over every codebook (``megatron_ualm.posttraining.dpo_loss``): the log-probability of a
response sums stream 0 and each codebook under the delay pattern with the pretraining loss
weights; ``--sft-loss-weight`` adds cross-entropy on the chosen response (the paper's
regulariser). The loop, flags, checkpoints and logging are pretraining's; TP / PP / SP, the
distributed optimizer and exact resume work as there.

- Start: ``--pretrained-checkpoint CKPT`` (the SFT / adaptation checkpoint) is the policy's
  starting point and the reference model; ``--load`` and ``--save`` on the run's directory
  make the same command resume.
- Data: a blend of ``preference`` shards (``tools/preprocess_preferences.py``, then
  ``tools/build_blend.py``). ``--micro-batch-size`` counts rows, two per pair (chosen then
  rejected, always in the same micro-batch), so it must be even; ``--global-batch-size`` too.
- Reference (``--reference``): ``precomputed`` (default) scores every pair once with the
  starting model before the first step and stores the log-probs in ``--reference-logps``
  (default ``<save>/reference_logps``), no second model in memory; ``model`` holds a frozen
  copy of ``--reference-checkpoint`` (default: the starting checkpoint) beside the policy and
  scores every step. Both give the same loss.
- Metrics (log line, TensorBoard, ``<save>/metrics.jsonl``): ``loss``, ``dpo loss``,
  ``sft loss``, ``reward accuracy``, ``reward margin``, ``chosen logp`` / ``rejected logp``
  and their ``text`` / ``codebook_{k}`` parts, per pair.

Example::

    torchrun --nproc-per-node 8 -m megatron_ualm.dpo --flavor qwen2.5-7b \\
        --tensor-model-parallel-size 4 --pipeline-model-parallel-size 2 --bf16 \\
        --pretrained-checkpoint /ckpt/adapted --load /ckpt/dpo --save /ckpt/dpo \\
        --blend-file pairs_blend.json --seq-length 2048 --micro-batch-size 2 --global-batch-size 64 \\
        --train-iters 1000 --lr 2e-7 --beta 0.1 --sft-loss-weight 1.0 --save-interval 100
"""

from __future__ import annotations

from typing import Optional, Sequence


def entry():
    """The ``TrainingEntry`` of this program (heavy imports here, after the warning summary is on)."""
    from megatron_ualm.evaluation.during_training import AudioEvalDuringTraining
    from megatron_ualm.posttraining import dpo_training
    from megatron_ualm.training import loop

    return loop.TrainingEntry(
        "dpo", dpo_training.datasets_provider, dpo_training.forward_step, add_args=dpo_training.add_args,
        check_data=dpo_training.check_data,
        extensions=(AudioEvalDuringTraining, dpo_training.ReferenceLogProbs, dpo_training.LogProbLine))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line and runs DPO on Megatron's loop."""
    from megatron_ualm.training.start import run_entry

    run_entry(entry, argv)


if __name__ == "__main__":
    main()
