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

from megatron_ualm.training import loop


def forward_step(data_iterator, model):
    """Megatron forward step: counts the micro-batch for the UALM metrics, then runs it."""
    from megatron_ualm import api

    batch = next(data_iterator)
    loop.record_batch(batch)
    return api.forward_step(iter([batch]), model)


def datasets_provider(train_val_test_num_samples: Sequence[int], vp_stage: Optional[int] = None):
    """Builds this rank's train / valid / test loaders (``--dataloader-type external``)."""
    from megatron.training import get_args, print_rank_0

    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.data.blend import build_datasets, format_table, load_plan
    from megatron_ualm.synthetic import FAMILIES
    from megatron_ualm.training.data import FamilyCollate, SyntheticDataset, build_loader
    from megatron_ualm.vocab import UALMVocab

    args = get_args()
    config = loop.model_config()
    vocab = UALMVocab.from_config(config)
    if args.synthetic_data:
        datasets = [SyntheticDataset(config, args.seq_length, int(n), seed=args.seed + i)
                    for i, n in enumerate(train_val_test_num_samples)]
        families = list(FAMILIES)
    else:
        plan = load_plan(args.blend_file)
        print_rank_0("> UALM data mixture:\n" + format_table(plan))
        datasets = build_datasets(plan, dict(
            random_seed=args.seed, sequence_length=args.seq_length, split=args.split or "98,1,1",
            vocab=vocab, audio_in=AudioInConfig.from_model_config(config) if config.audio_encoder_type else None,
            cfg_condition_dropout=config.cfg_condition_dropout,
            path_to_cache=args.data_cache_path, mmap_bin_files=True, tokenizer=None,
        ), train_val_test_num_samples)
        families = plan.families

    collate = FamilyCollate(args.seq_length, vocab, families,
                            attention_mask=config.transformer_impl != "transformer_engine")
    consumed = (args.consumed_train_samples, args.consumed_valid_samples, 0)
    loaders = [build_loader(ds, collate, args.micro_batch_size, c, args.num_workers, args.seed + i)
               for i, (ds, c) in enumerate(zip(datasets, consumed))]
    return tuple(iter(loader) if loader is not None else None for loader in loaders)


datasets_provider.is_distributed = True  # every rank reads its own batches (no TP broadcast)

ENTRY = loop.TrainingEntry("pretrain", datasets_provider, forward_step)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line and runs Megatron's ``pretrain`` on UALM."""
    loop.run(ENTRY, argv)


if __name__ == "__main__":
    main()
