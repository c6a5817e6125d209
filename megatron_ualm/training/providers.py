"""The callables Megatron's ``pretrain()`` takes, for UALM language-model training (pretraining
and SFT): the model provider, the datasets provider and the forward step.

Each takes the run's ``RunContext`` first; ``training.loop`` binds it (``functools.partial``)
before handing them to Megatron, which calls them with its own arguments.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_ualm.training.hooks import RunContext


def model_provider(ctx: RunContext, pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, pg_collection=None):
    """One UALM stage with the run's freezing policy applied (``--freeze``); the stage is kept in
    ``ctx.model_chunks`` for the extensions (e.g. the audio evaluation generates with it)."""
    from megatron.training import print_rank_0

    from megatron_ualm.models.ualm_model import UALMModel
    from megatron_ualm.training.freeze import apply_freeze_policy

    model = UALMModel(ctx.model_config(), pre_process=pre_process, post_process=post_process,
                      vp_stage=vp_stage, pg_collection=pg_collection)
    trainable = apply_freeze_policy(model, ctx.args.freeze)
    print_rank_0(f"> UALM stage (pre={pre_process}, post={post_process}, vp={vp_stage}): "
                 f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters "
                 f"(freeze policy: {ctx.args.freeze})")
    ctx.model_chunks.append(model)
    return model


def forward_step(ctx: RunContext, data_iterator, model):
    """Megatron forward step: counts the micro-batch for the ``[UALM]`` line, then runs it."""
    from megatron_ualm import api

    batch = next(data_iterator)
    ctx.count_batch(batch, model)
    return api.forward_step(iter([batch]), model)


def datasets_provider(ctx: RunContext, train_val_test_num_samples: Sequence[int], vp_stage: Optional[int] = None):
    """This rank's train / valid / test iterators (``--dataloader-type external``): the blend of
    ``--blend-file``, or generated mixed-family rows with ``--synthetic-data``."""
    from megatron.training import print_rank_0

    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.data.blend import build_datasets, format_table, load_plan
    from megatron_ualm.synthetic import FAMILIES, SyntheticDataset
    from megatron_ualm.training.data import FamilyCollate, build_loader
    from megatron_ualm.vocab import UALMVocab

    args = ctx.args
    config = ctx.model_config()
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
