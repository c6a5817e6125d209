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

import json
import os
import sys
from typing import Optional, Sequence

import torch

from megatron_ualm.compat import cpu as cpu_compat
from megatron_ualm.compat import megatron_fixes
from megatron_ualm.training.arguments import add_ualm_args, flavor_argv, ualm_config_from_args, _flavor_of

_STATE: dict = {}


def _config():
    """The run's UALMConfig, built once from Megatron's parsed arguments."""
    if "config" not in _STATE:
        from megatron.training import get_args

        _STATE["config"] = ualm_config_from_args(get_args())
    return _STATE["config"]


def _throughput():
    """The UALM metrics; created on first use, once the parallel sizes are known."""
    if "throughput" not in _STATE:
        from megatron.training import get_args

        from megatron_ualm.training.metrics import UALMThroughput

        a = get_args()
        _STATE["throughput"] = UALMThroughput(_config(), a.seq_length, a.world_size, a.data_parallel_size)
    return _STATE["throughput"]


def _cpu_argv() -> list[str]:
    """Flags a CPU-only run needs (gloo, CPU init, no CUDA-only fusions); on GPU, the fusions
    whose extensions are missing are switched off instead of failing at the first step."""
    if torch.cuda.is_available():
        try:
            import fused_weight_gradient_mlp_cuda  # noqa: F401  (apex's wgrad accumulation kernel)
        except ImportError:
            return ["--no-gradient-accumulation-fusion"]
        return []
    return [
        "--distributed-backend", "gloo", "--use-cpu-initialization",
        "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
        "--distributed-timeout-minutes", "5",
    ]


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """Megatron model provider: one UALM stage with the run's freezing policy applied."""
    from megatron.training import get_args, print_rank_0

    from megatron_ualm.models.ualm_model import UALMModel
    from megatron_ualm.training.freeze import apply_freeze_policy

    args = get_args()
    model = UALMModel(_config(), pre_process=pre_process, post_process=post_process,
                      vp_stage=vp_stage, pg_collection=pg_collection)
    trainable = apply_freeze_policy(model, args.freeze)
    print_rank_0(f"> UALM stage (pre={pre_process}, post={post_process}, vp={vp_stage}): "
                 f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters "
                 f"(freeze policy: {args.freeze})")
    return model


def forward_step(data_iterator, model):
    """Megatron forward step: counts the micro-batch for the UALM metrics, then runs it."""
    from megatron_ualm import api

    batch = next(data_iterator)
    _throughput().counters.record(batch)
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
    config = _config()
    vocab = UALMVocab.from_config(config)
    if args.synthetic_data:
        datasets = [SyntheticDataset(config, args.seq_length, int(n), seed=args.seed + i)
                    for i, n in enumerate(train_val_test_num_samples)]
        families = list(FAMILIES)
    elif args.blend_file:
        plan = load_plan(args.blend_file)
        print_rank_0("> UALM data mixture:\n" + format_table(plan))
        datasets = build_datasets(plan, dict(
            random_seed=args.seed, sequence_length=args.seq_length, split=args.split or "98,1,1",
            vocab=vocab, audio_in=AudioInConfig.from_model_config(config) if config.audio_encoder_type else None,
            cfg_condition_dropout=config.cfg_condition_dropout,
            path_to_cache=args.data_cache_path, mmap_bin_files=True, tokenizer=None,
        ), train_val_test_num_samples)
        families = plan.families
    else:
        raise SystemExit("give the training data: --blend-file (tools/build_blend.py) or --synthetic-data")

    collate = FamilyCollate(args.seq_length, vocab, families,
                            attention_mask=config.transformer_impl != "transformer_engine")
    consumed = (args.consumed_train_samples, args.consumed_valid_samples, 0)
    loaders = [build_loader(ds, collate, args.micro_batch_size, c, args.num_workers, args.seed + i)
               for i, (ds, c) in enumerate(zip(datasets, consumed))]
    return tuple(iter(loader) if loader is not None else None for loader in loaders)


datasets_provider.is_distributed = True  # every rank reads its own batches (no TP broadcast)


def _install_ualm_logging() -> None:
    """Wraps Megatron's training_log: after each log line, UALM throughput and family counts."""
    from megatron.training import get_args, get_tensorboard_writer
    from megatron.training import training as mtraining
    from megatron.training.utils import print_rank_last

    original = mtraining.training_log

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
        result = original(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
        args = get_args()
        if iteration % args.log_interval == 0:
            metrics = _throughput().report()
            losses = {k: float(v) for k, v in loss_dict.items()}
            line = " | ".join(f"{k}: {v:.4g}" if "per" in k else f"{k}: {v}" for k, v in metrics.items())
            print_rank_last(f" [UALM] iteration {iteration:8d} | {line}")
            writer = get_tensorboard_writer()
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"ualm/{k}", v, iteration)
            if args.save and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
                os.makedirs(args.save, exist_ok=True)
                with open(os.path.join(args.save, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"iteration": iteration, "lr": learning_rate, **losses, **metrics}) + "\n")
        return result

    mtraining.training_log = training_log


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line and runs Megatron's ``pretrain`` on UALM."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_compat.apply_training()
    megatron_fixes.apply()
    flavor = _flavor_of(argv)
    sys.argv = [sys.argv[0]] + flavor_argv(flavor) + _cpu_argv() + argv

    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.training import pretrain

    from megatron_ualm.training.checkpointing import make_checkpoints_atomic

    args = parse_and_validate_args(extra_args_provider=add_ualm_args)
    cfg = pretrain_cfg_container_from_args(args)
    _install_ualm_logging()
    make_checkpoints_atomic()

    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)
    if args.loss_plot and args.save and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        from megatron_ualm.training.plot import plot_metrics

        plot_metrics(os.path.join(args.save, "metrics.jsonl"), args.loss_plot)


if __name__ == "__main__":
    main()
