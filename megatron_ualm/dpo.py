"""Direct preference optimisation (DPO) of UALM on Megatron's training loop.

Sigmoid DPO over every codebook (``megatron_ualm.posttraining.dpo``): the log-probability of a
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

import argparse
import os
from typing import Optional, Sequence

from megatron_ualm.training import loop

_STATE: dict = {}


def add_args(parser: argparse.ArgumentParser) -> None:
    """DPO's flags (after Megatron's and UALM's)."""
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="DPO inverse temperature (default 0.1, as the paper)")
    g.add_argument("--sft-loss-weight", type=float, default=0.0,
                   help="weight of the cross-entropy on the chosen response (per supervised cell) added to the DPO "
                        "loss; the paper regularises with it (default 0: plain DPO)")
    g.add_argument("--length-normalization", action="store_true",
                   help="divide each response's log-probability by its supervised cells before the DPO difference")
    g.add_argument("--reference", choices=("precomputed", "model"), default="precomputed",
                   help="precomputed (default): score every pair once with the starting model and store the "
                        "log-probs (no second model in memory, no reference forward per step); model: a frozen "
                        "reference model beside the policy scores every step")
    g.add_argument("--reference-logps", default=None,
                   help="directory of the stored reference log-probs (default: <save>/reference_logps); computed "
                        "before the first step when absent, read when present")
    g.add_argument("--reference-checkpoint", default=None,
                   help="--reference model: the reference weights (default: --pretrained-checkpoint)")


def _dpo_config():
    if "dpo" not in _STATE:
        from megatron.training import get_args

        from megatron_ualm.posttraining.dpo import DPOConfig

        a = get_args()
        _STATE["dpo"] = DPOConfig(a.beta, a.sft_loss_weight, a.length_normalization)
    return _STATE["dpo"]


def _store_dir(args: argparse.Namespace) -> Optional[str]:
    return args.reference_logps or (os.path.join(args.save, "reference_logps") if args.save else None)


def _has_checkpoint(path: Optional[str]) -> bool:
    from megatron_ualm.model_record import TRACKER

    return bool(path) and os.path.isfile(os.path.join(path, TRACKER))


def check_data(args: argparse.Namespace) -> None:
    """The run's data, batch shape, DPO settings and reference, before anything is built."""
    from megatron_ualm.data.blend import load_plan
    from megatron_ualm.posttraining.dpo import DPOConfig
    from megatron_ualm.posttraining.reference import STORE_META

    from megatron_ualm.finetune import check_resumable

    check_resumable(args)
    if args.synthetic_data or not args.blend_file:
        raise ValueError("DPO trains on preference pairs: give --blend-file (tools/preprocess_preferences.py, then "
                         "tools/build_blend.py)")
    loop.check_blend(args)
    plan = load_plan(args.blend_file)
    other = [(p, f) for p, f in zip(plan.shards, plan.families) if f != "preference"]
    if other:
        raise ValueError(f"--blend-file {args.blend_file} holds {other[0][1]} shards ({other[0][0]}); DPO reads "
                         "preference shards only (tools/preprocess_preferences.py)")
    if args.micro_batch_size % 2:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size}: DPO counts rows, two per pair (chosen and "
                         "rejected in the same micro-batch); give an even number")
    DPOConfig(args.beta, args.sft_loss_weight, args.length_normalization)
    if not _has_checkpoint(args.pretrained_checkpoint):
        raise ValueError(f"no checkpoint in --pretrained-checkpoint {args.pretrained_checkpoint}" if
                         args.pretrained_checkpoint else
                         "DPO starts from --pretrained-checkpoint CKPT (the SFT or adaptation checkpoint; also the "
                         "reference model), with --load/--save on the run's own directory")
    resumed = _has_checkpoint(args.load)
    if args.reference == "precomputed":
        store = _store_dir(args)
        if store is None:
            raise ValueError("--reference precomputed stores the reference log-probs: give --save or --reference-logps")
        if resumed and not os.path.isfile(os.path.join(store, STORE_META)):
            raise ValueError(f"resuming {args.load}, but {store} holds no reference log-probs ({STORE_META}); they "
                             "are computed by the first run from the starting checkpoint: point --reference-logps at "
                             "that run's directory")
    elif not _has_checkpoint(args.reference_checkpoint or args.pretrained_checkpoint):
        raise ValueError(f"--reference-checkpoint {args.reference_checkpoint}: no checkpoint there")


def _install_reference(args, config, plan, kwargs: dict) -> None:
    """Builds the reference source of the run and wraps Megatron's schedule with it (once)."""
    import numpy as np
    from megatron.core.datasets.utils import Split

    from megatron_ualm.data.dataset import UALMDatasetConfig
    from megatron_ualm.data.preference import PreferenceDataset
    from megatron_ualm.data.shards import ShardReader
    from megatron_ualm.model_record import resolve_checkpoint
    from megatron_ualm.posttraining import reference

    def pass_datasets() -> list:
        cfg = UALMDatasetConfig(blend=plan.megatron_blend(), **kwargs)
        out = []
        for i, path in enumerate(plan.shards):
            reader = ShardReader(path)
            ds = PreferenceDataset(reader, path, np.arange(len(reader), dtype=np.int32), None, Split.train, cfg)
            ds.shard_index = i
            out.append(ds)
        return out

    def frozen():
        from megatron_ualm.training.arguments import ualm_config_from_args

        # A fresh config: the policy's now holds the training loop's hooks (process groups,
        # timers), which the model's construction cannot deep-copy.
        return reference.FrozenReference(ualm_config_from_args(args), args.reference_checkpoint or
                                         args.pretrained_checkpoint, args.virtual_pipeline_model_parallel_size)

    identity = os.path.abspath(resolve_checkpoint(args.pretrained_checkpoint))
    source = reference.ReferenceSource(
        args.reference, _store_dir(args), reference.store_meta(plan, args.seq_length, config.num_codebooks, identity),
        pass_datasets=pass_datasets, frozen=frozen, allow_pass=args.iteration == 0)
    reference.install(source)
    _STATE["source"] = source


def _install_logp_line() -> None:
    """After each log line, a ``[DPO]`` line with the log-probabilities.

    Megatron's line leaves out negative values (it prints averages >= 0 only), so the
    log-probs reach TensorBoard and ``metrics.jsonl`` but not its line; this line shows them.
    """
    from megatron.training import get_args
    from megatron.training import training as mtraining
    from megatron.training.utils import print_rank_last

    inner = mtraining.training_log

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        result = inner(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
        if iteration % get_args().log_interval == 0:
            logps = " | ".join(f"{k}: {float(v):.5g}" for k, v in loss_dict.items() if k.endswith("logp"))
            if logps:
                print_rank_last(f" [DPO] iteration {iteration:8d} | {logps}")
        return result

    mtraining.training_log = training_log


def datasets_provider(train_val_test_num_samples: Sequence[int], vp_stage: Optional[int] = None):
    """This rank's train / valid / test loaders of pair micro-batches (``--dataloader-type external``)."""
    from megatron.core import parallel_state
    from megatron.training import get_args, print_rank_0

    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.data.blend import build_data_loader, build_datasets, format_table, load_plan
    from megatron_ualm.data.preference import PairCollate, PreferenceDataset
    from megatron_ualm.vocab import UALMVocab

    args = get_args()
    config = loop.model_config()
    vocab = UALMVocab.from_config(config)
    plan = load_plan(args.blend_file)
    print_rank_0("> DPO preference pairs:\n" + format_table(plan))
    kwargs = dict(random_seed=args.seed, sequence_length=args.seq_length, split=args.split or "98,2,0", vocab=vocab,
                  audio_in=AudioInConfig.from_model_config(config) if config.audio_encoder_type else None,
                  cfg_condition_dropout=0.0, path_to_cache=args.data_cache_path, mmap_bin_files=True, tokenizer=None)
    pairs = [-(-int(n or 0) // 2) for n in train_val_test_num_samples]  # Megatron counts rows, two per pair
    datasets = build_datasets(plan, kwargs, pairs, dataset_cls=PreferenceDataset)
    if "source" not in _STATE:
        _install_reference(args, config, plan, kwargs)
        _install_logp_line()
    collate = PairCollate(args.seq_length, vocab)
    consumed = (args.consumed_train_samples, args.consumed_valid_samples, 0)
    loaders = [None if ds is None else build_data_loader(
        ds, args.seq_length, vocab, args.micro_batch_size // 2, c // 2, parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(), args.num_workers, collate_fn=collate, seed=args.seed + i)
        for i, (ds, c) in enumerate(zip(datasets, consumed))]
    return tuple(iter(loader) if loader is not None else None for loader in loaders)


datasets_provider.is_distributed = True  # every rank reads its own batches (no TP broadcast)


def forward_step(data_iterator, model):
    """Megatron forward step: counts the pair rows for the UALM metrics, then the DPO step."""
    from megatron_ualm.posttraining.dpo import dpo_forward_step

    batch = next(data_iterator)
    loop.record_batch(batch.rows)
    return dpo_forward_step(_dpo_config(), iter([batch]), model)


ENTRY = loop.TrainingEntry("dpo", datasets_provider, forward_step, add_args=add_args, check_data=check_data)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line and runs DPO on Megatron's loop."""
    loop.run(ENTRY, argv)


if __name__ == "__main__":
    main()
