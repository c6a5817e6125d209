"""DPO on Megatron's training loop: the flags, checks, data and forward step of
``python -m megatron_ualm.dpo``, and its two extensions of the loop.

- ``add_args`` / ``check_data``: DPO's flags, and everything checked before the model is built
  (preference shards only, an even micro-batch, a starting checkpoint, a reference source);
- ``datasets_provider`` / ``forward_step``: pair micro-batches (chosen then rejected rows) and
  the DPO loss (``posttraining.dpo_loss``);
- ``ReferenceLogProbs``: attaches the reference log-probabilities to each step's pairs before
  the schedule runs (``posttraining.reference``: stored once, or a frozen model);
- ``LogProbLine``: a ``[DPO]`` line with the log-probabilities after Megatron's.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megatron_ualm.checkpoint_format import has_checkpoint
from megatron_ualm.training import checks
from megatron_ualm.training.hooks import RunContext, TrainingExtension


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


def dpo_config(args: argparse.Namespace):
    """The run's ``DPOConfig`` (validated)."""
    from megatron_ualm.posttraining.dpo_loss import DPOConfig

    return DPOConfig(args.beta, args.sft_loss_weight, args.length_normalization)


def store_dir(args: argparse.Namespace) -> Optional[str]:
    """Where the reference log-probs are stored (``--reference-logps``, else ``<save>/reference_logps``)."""
    return args.reference_logps or (os.path.join(args.save, "reference_logps") if args.save else None)


def check_data(args: argparse.Namespace) -> None:
    """The run's data, batch shape, DPO settings and reference, before anything is built."""
    from megatron_ualm.data.blend import load_plan
    from megatron_ualm.posttraining.reference import STORE_META

    if args.synthetic_data or not args.blend_file:
        raise ValueError("DPO trains on preference pairs: give --blend-file (tools/preprocess_preferences.py, then "
                         "tools/build_blend.py)")
    checks.check_blend(args)
    plan = load_plan(args.blend_file)
    other = [(p, f) for p, f in zip(plan.shards, plan.families) if f != "preference"]
    if other:
        raise ValueError(f"--blend-file {args.blend_file} holds {other[0][1]} shards ({other[0][0]}); DPO reads "
                         "preference shards only (tools/preprocess_preferences.py)")
    if args.micro_batch_size % 2:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size}: DPO counts rows, two per pair (chosen and "
                         "rejected in the same micro-batch); give an even number")
    dpo_config(args)
    if not has_checkpoint(args.pretrained_checkpoint):
        raise ValueError(f"no checkpoint in --pretrained-checkpoint {args.pretrained_checkpoint}" if
                         args.pretrained_checkpoint else
                         "DPO starts from --pretrained-checkpoint CKPT (the SFT or adaptation checkpoint; also the "
                         "reference model), with --load/--save on the run's own directory")
    if args.reference == "precomputed":
        store = store_dir(args)
        if store is None:
            raise ValueError("--reference precomputed stores the reference log-probs: give --save or --reference-logps")
        if has_checkpoint(args.load) and not os.path.isfile(os.path.join(store, STORE_META)):
            raise ValueError(f"resuming {args.load}, but {store} holds no reference log-probs ({STORE_META}); they "
                             "are computed by the first run from the starting checkpoint: point --reference-logps at "
                             "that run's directory")
    elif not has_checkpoint(args.reference_checkpoint or args.pretrained_checkpoint):
        raise ValueError(f"--reference-checkpoint {args.reference_checkpoint}: no checkpoint there")


def _dataset_kwargs(ctx: RunContext) -> dict:
    """``UALMDatasetConfig`` fields of the run's pair datasets (training and the reference pass)."""
    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.vocab import UALMVocab

    args, config = ctx.args, ctx.model_config()
    return dict(random_seed=args.seed, sequence_length=args.seq_length, split=args.split or "98,2,0",
                vocab=UALMVocab.from_config(config),
                audio_in=AudioInConfig.from_model_config(config) if config.audio_encoder_type else None,
                cfg_condition_dropout=0.0, path_to_cache=args.data_cache_path, mmap_bin_files=True, tokenizer=None)


def datasets_provider(ctx: RunContext, train_val_test_num_samples: Sequence[int], vp_stage: Optional[int] = None):
    """This rank's train / valid / test iterators of pair micro-batches (``--dataloader-type external``)."""
    from megatron.core import parallel_state
    from megatron.training import print_rank_0

    from megatron_ualm.data.blend import build_data_loader, build_datasets, format_table, load_plan
    from megatron_ualm.data.preference import PairCollate, PreferenceDataset

    args = ctx.args
    plan = load_plan(args.blend_file)
    print_rank_0("> DPO preference pairs:\n" + format_table(plan))
    kwargs = _dataset_kwargs(ctx)
    pairs = [-(-int(n or 0) // 2) for n in train_val_test_num_samples]  # Megatron counts rows, two per pair
    datasets = build_datasets(plan, kwargs, pairs, dataset_cls=PreferenceDataset)
    collate = PairCollate(args.seq_length, kwargs["vocab"])
    consumed = (args.consumed_train_samples, args.consumed_valid_samples, 0)
    loaders = [None if ds is None else build_data_loader(
        ds, args.seq_length, kwargs["vocab"], args.micro_batch_size // 2, c // 2,
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(), args.num_workers,
        collate_fn=collate, seed=args.seed + i)
        for i, (ds, c) in enumerate(zip(datasets, consumed))]
    return tuple(iter(loader) if loader is not None else None for loader in loaders)


datasets_provider.is_distributed = True  # every rank reads its own batches (no TP broadcast)


def forward_step(ctx: RunContext, data_iterator, model):
    """Megatron forward step: counts the pair rows for the ``[UALM]`` line, then the DPO step."""
    from megatron_ualm.posttraining.dpo_loss import dpo_forward_step

    batch = next(data_iterator)
    ctx.count_batch(batch.rows, model)
    return dpo_forward_step(dpo_config(ctx.args), iter([batch]), model)


class ReferenceLogProbs(TrainingExtension):
    """Gives each train / eval step's pair micro-batches their reference log-probabilities.

    The source is built at the first schedule call, once the loop has loaded the checkpoint
    (a resumed run may read the stored log-probs but not compute them: its policy is no longer
    the starting model).
    """

    def __init__(self) -> None:
        self.source = None

    def _make_source(self, ctx: RunContext):
        import numpy as np
        from megatron.core.datasets.utils import Split

        from megatron_ualm.checkpoint_format import resolve_checkpoint
        from megatron_ualm.config import config_from_megatron_args
        from megatron_ualm.data.blend import load_plan
        from megatron_ualm.data.dataset import UALMDatasetConfig
        from megatron_ualm.data.preference import PreferenceDataset
        from megatron_ualm.data.shards import ShardReader
        from megatron_ualm.posttraining import reference

        args = ctx.args
        plan = load_plan(args.blend_file)
        kwargs = _dataset_kwargs(ctx)

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
            # A fresh config: the policy's holds the training loop's hooks (process groups,
            # timers), which the model's construction cannot deep-copy.
            return reference.FrozenReference(config_from_megatron_args(args), args.reference_checkpoint or
                                             args.pretrained_checkpoint, args.virtual_pipeline_model_parallel_size)

        identity = os.path.abspath(resolve_checkpoint(args.pretrained_checkpoint))
        meta = reference.store_meta(plan, args.seq_length, ctx.model_config().num_codebooks, identity)
        return reference.ReferenceSource(args.reference, store_dir(args), meta, pass_datasets=pass_datasets,
                                         frozen=frozen, allow_pass=args.iteration == 0)

    def before_schedule(self, ctx: RunContext, call: dict) -> None:
        """Reads the call's micro-batches, attaches their reference log-probs, hands them on."""
        if self.source is None:
            self.source = self._make_source(ctx)
        iterators = call["data_iterator"]
        chunks = iterators if isinstance(iterators, list) else [iterators]
        n = call["num_microbatches"]
        batches = [[next(it) for _ in range(n)] for it in chunks]
        self.source.attach(batches, call["model"], call["seq_length"], call["micro_batch_size"])
        fresh = [iter(b) for b in batches]
        call["data_iterator"] = fresh if isinstance(iterators, list) else fresh[0]


class LogProbLine(TrainingExtension):
    """After each log line, a ``[DPO]`` line with the log-probabilities.

    Megatron's line leaves out negative values (it prints averages >= 0 only), so the
    log-probs reach TensorBoard and ``metrics.jsonl`` but not its line; this line shows them.
    A codebook's log-prob is a sum over its tokens, so it is exactly 0 only where no response of
    that side since the last line held audio (text-only pairs): those are left out, and the line
    says so.
    """

    @staticmethod
    def _without_audio(losses: dict) -> set:
        """The codebook log-prob entries that are exactly 0: no response of that side held audio."""
        return {k for k, v in losses.items() if k.endswith("logp") and " codebook_" in k and float(v) == 0.0}

    def after_evaluate(self, ctx: RunContext, losses: dict) -> dict:
        """The validation line leaves them out too (Megatron would print sixteen zeros, each with
        a "PPL" of 1, for text-only pairs)."""
        no_audio = self._without_audio(losses)
        return {k: v for k, v in losses.items() if k not in no_audio}

    def after_log(self, ctx: RunContext, iteration: int, loss_dict: dict) -> None:
        from megatron.training.utils import print_rank_last

        logps = {k: float(v) for k, v in loss_dict.items() if k.endswith("logp")}
        no_audio = self._without_audio(logps)
        shown = [f"{k}: {v:.5g}" for k, v in logps.items() if k not in no_audio]
        if no_audio:
            shown.append("codebook logps of 0 left out (no audio tokens)")
        if logps:
            print_rank_last(f" [DPO] iteration {iteration:8d} | " + " | ".join(shown))
