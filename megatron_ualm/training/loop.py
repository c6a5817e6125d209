"""What every UALM training entry point shares around Megatron-LM's ``pretrain()`` loop.

``pretrain``, ``finetune`` and ``dpo`` differ in their data and forward step; everything else
is here, in the order a run meets it:

1. the command line: the flavor's backbone flags, the CPU flags (gloo, no CUDA fusions) or the
   GPU fallbacks, then the user's flags (which win), parsed by Megatron with UALM's groups;
2. checks before anything is built, each ending the run with one line that says what to do:
   the ``--save`` directory is locked for this run (``run_lock``) and holds no other run's
   checkpoints, the ``--load`` iteration exists, the data is readable (blend file and shards),
   and the token-id layout and architecture of the checkpoint to load match this run's;
3. checkpoints: saved atomically (``checkpointing``), with the ``ualm`` record that makes
   them self-describing (``megatron_ualm.model_record``), and a clear "no space left" stop;
4. logging: after Megatron's line, a ``[UALM]`` line (tokens/s/GPU, model TFLOP/s, samples per
   family summed over data-parallel ranks) to stdout, TensorBoard and ``<save>/metrics.jsonl``.

An entry point describes itself with a ``TrainingEntry`` and calls ``run(entry)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_ualm.compat import cpu as cpu_compat
from megatron_ualm.compat import megatron_fixes
from megatron_ualm.errors import CheckpointError
from megatron_ualm.evaluation import during_training
from megatron_ualm.training import exit_guard
from megatron_ualm.training.arguments import add_ualm_args, flavor_argv, flavor_of, ualm_config_from_args

_STATE: dict = {}


@dataclass
class TrainingEntry:
    """One training entry point.

    Attributes:
        name: the program, for messages (``pretrain``, ``finetune``, ``dpo``).
        datasets_provider: Megatron's ``train_valid_test_dataset_provider``.
        forward_step: Megatron's ``forward_step_func``; call ``record_batch(batch)`` on each
            micro-batch so the ``[UALM]`` line counts it.
        model_provider: Megatron's model provider (default: one UALM stage with the freezing
            policy of ``--freeze``).
        add_args: adds the entry point's own flags to Megatron's parser (after UALM's).
        data_layout: the token-id layout the run's data implies (``vocab.vocab_layout``), None
            when unknown; compared with the checkpoint to load. Default: from ``--blend-file``.
        check_data: checks the run's data before the model is built; raises ``ValueError`` /
            ``OSError`` with a message naming the file. Default: the blend file and its shards.
    """

    name: str
    datasets_provider: Callable
    forward_step: Callable
    model_provider: Optional[Callable] = None
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    data_layout: Optional[Callable[[argparse.Namespace], Optional[dict]]] = None
    check_data: Optional[Callable[[argparse.Namespace], None]] = None


# ---------------------------------------------------------------------------------------------
# State shared by the providers of one run.

def model_config():
    """The run's ``UALMConfig``, built once from Megatron's parsed arguments."""
    if "config" not in _STATE:
        from megatron.training import get_args

        _STATE["config"] = ualm_config_from_args(get_args())
    return _STATE["config"]


def throughput():
    """The UALM metrics; created on first use, once the parallel sizes are known."""
    if "throughput" not in _STATE:
        from megatron.training import get_args

        from megatron_ualm.training.metrics import UALMThroughput

        a = get_args()
        _STATE["throughput"] = UALMThroughput(model_config(), a.seq_length, a.world_size, a.data_parallel_size)
    return _STATE["throughput"]


def record_batch(batch) -> None:
    """Counts one micro-batch for the ``[UALM]`` line (call from the forward step)."""
    throughput().counters.record(batch)


def default_model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                           config=None, pg_collection=None):
    """Megatron model provider: one UALM stage with the run's freezing policy applied."""
    from megatron.training import get_args, print_rank_0

    from megatron_ualm.models.ualm_model import UALMModel
    from megatron_ualm.training.freeze import apply_freeze_policy

    args = get_args()
    model = UALMModel(model_config(), pre_process=pre_process, post_process=post_process,
                      vp_stage=vp_stage, pg_collection=pg_collection)
    trainable = apply_freeze_policy(model, args.freeze)
    print_rank_0(f"> UALM stage (pre={pre_process}, post={post_process}, vp={vp_stage}): "
                 f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters "
                 f"(freeze policy: {args.freeze})")
    return model


# ---------------------------------------------------------------------------------------------
# Command line.

def _device_argv() -> list[str]:
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


def _parse(entry: TrainingEntry, argv: Sequence[str]) -> argparse.Namespace:
    from megatron.training.arguments import parse_and_validate_args

    flavor = flavor_of(argv)
    sys.argv = [f"python -m megatron_ualm.{entry.name}"] + flavor_argv(flavor) + _device_argv() + list(argv)

    def extra(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_ualm_args(parser)
        during_training.add_args(parser)
        if entry.add_args is not None:
            entry.add_args(parser)
        return parser

    return parse_and_validate_args(extra_args_provider=extra)


# ---------------------------------------------------------------------------------------------
# Checks before anything is built.

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


def _has_checkpoints(directory: Optional[str]) -> bool:
    from megatron_ualm.model_record import TRACKER, iterations_in

    return bool(directory) and (os.path.isfile(os.path.join(directory, TRACKER)) or bool(iterations_in(directory)))


def check_directories(args: argparse.Namespace) -> None:
    """``--save`` holds no other run's checkpoints; the checkpoint ``--load`` names exists."""
    from megatron_ualm.model_record import RELEASE, TRACKER, missing_iteration_message

    if args.save and _has_checkpoints(args.save) and os.path.abspath(args.load or "") != os.path.abspath(args.save):
        raise CheckpointError(
            f"--save {args.save} already holds checkpoints of another run; resume it with --load {args.save}, or "
            "choose a new --save directory")
    if args.load and os.path.isfile(os.path.join(args.load, TRACKER)):
        step = getattr(args, "ckpt_step", None)
        if step is None:
            with open(os.path.join(args.load, TRACKER)) as f:
                text = f.read().strip()
            folder = RELEASE if text == RELEASE else f"iter_{int(text):07d}" if text.isdigit() else None
        else:
            folder = f"iter_{int(step):07d}"
        if folder is None or not os.path.isdir(os.path.join(args.load, folder)):
            raise CheckpointError(missing_iteration_message(args.load, folder or "no iteration"))


def checkpoint_to_load(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint directory Megatron will load (``--load``, else ``--pretrained-checkpoint``)."""
    from megatron_ualm.model_record import TRACKER

    for path in (args.load, getattr(args, "pretrained_checkpoint", None)):
        if path and os.path.isfile(os.path.join(path, TRACKER)):
            if path == args.load and getattr(args, "ckpt_step", None) is not None:
                return os.path.join(path, f"iter_{int(args.ckpt_step):07d}")
            return path
    return None


def check_checkpoint(args: argparse.Namespace, run_config, run_layout: Optional[dict]) -> Optional[dict]:
    """The record of the checkpoint to load, checked against this run (architecture, vocabulary).

    Returns:
        The record, or None when nothing is loaded or the checkpoint has none.
    """
    from megatron_ualm.model_record import ARCH_FIELDS, read_record, record_layout
    from megatron_ualm.vocab import check_layouts, vocab_layout

    path = checkpoint_to_load(args)
    if path is None:
        return None
    record = read_record(path)
    if record is None:
        return None
    ours = {f: getattr(run_config, f) for f in ARCH_FIELDS}
    diff = [f"{f} {record['arch'][f]!r} (checkpoint) vs {ours[f]!r} (this run)" for f in ARCH_FIELDS
            if f in record["arch"] and record["arch"][f] != ours[f]]
    if diff:
        raise CheckpointError(f"checkpoint {path} was trained with another model: " + "; ".join(diff)
                              + f". Use --flavor {record.get('flavor')} and the flags of that run")
    run = vocab_layout(None, run_config.text_vocab_size, run_config.num_codebooks, run_config.codebook_size)
    if run_layout is not None:
        run = dict(run, tokenizer=run_layout.get("tokenizer"))
    check_layouts(record_layout(record), f"checkpoint {path}", run, f"this run ({args.blend_file or 'its data'})")
    return record


# ---------------------------------------------------------------------------------------------
# Checkpoints carry the record.

def _install_record(record: dict) -> None:
    """Adds the ``ualm`` record to the common state of every checkpoint Megatron saves."""
    from megatron.training import checkpointing

    from megatron_ualm.model_record import RECORD_KEY

    def make(original):
        def generate_state_dict(*args, **kwargs):
            state_dict = original(*args, **kwargs)
            state_dict[RECORD_KEY] = record
            return state_dict

        return generate_state_dict

    megatron_fixes.wrap_once(checkpointing, "generate_state_dict", make)


# ---------------------------------------------------------------------------------------------
# Logging.

def _install_ualm_logging() -> None:
    """Wraps Megatron's training_log: after each log line, UALM throughput and family counts."""
    from megatron.training import get_args, get_tensorboard_writer, get_wandb_writer
    from megatron.training import training as mtraining
    from megatron.training.utils import print_rank_last

    def make(original):
        def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs):
            result = original(loss_dict, total_loss_dict, learning_rate, iteration, *rest, **kwargs)
            args = get_args()
            if iteration % args.log_interval == 0:
                metrics = throughput().report()  # a collective over the data-parallel group
                losses = {k: float(v) for k, v in loss_dict.items()}
                line = " | ".join(f"{k}: {v:.4g}" if "per" in k else f"{k}: {v}" for k, v in metrics.items())
                print_rank_last(f" [UALM] iteration {iteration:8d} | {line}")
                for writer in (get_tensorboard_writer(),):
                    if writer is not None:
                        for k, v in metrics.items():
                            writer.add_scalar(f"ualm/{k}", v, iteration)
                wandb = get_wandb_writer()
                if wandb is not None:
                    wandb.log({f"ualm/{k}": v for k, v in metrics.items()}, iteration)
                if args.save and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
                    append_metrics(args.save, {"iteration": iteration, "lr": learning_rate, **losses, **metrics})
            return result

        return training_log

    megatron_fixes.wrap_once(mtraining, "training_log", make)


def _install_validation_filter() -> None:
    """Wraps Megatron's evaluate: a validation set without codebook cells reports no codebook
    losses rather than ``nan`` (``losses.drop_empty_codebook_losses``)."""
    from megatron.training import training as mtraining

    from megatron_ualm.losses import drop_empty_codebook_losses

    def make(original):
        def evaluate(*args, **kwargs):
            total_loss_dict, collected, timelimit = original(*args, **kwargs)
            if total_loss_dict:
                total_loss_dict = drop_empty_codebook_losses(total_loss_dict)
            return total_loss_dict, collected, timelimit

        return evaluate

    megatron_fixes.wrap_once(mtraining, "evaluate", make)


def append_metrics(save_dir: str, row: dict) -> None:
    """Appends one row to ``<save>/metrics.jsonl`` (the last rank writes; one run per directory)."""
    os.makedirs(save_dir, exist_ok=True)
    with open(os.path.join(save_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------

def _standalone_env() -> None:
    """Lets ``python -m megatron_ualm.<entry>`` run as a world of one without a launcher.

    Megatron's initialisation reads the launcher's variables (torchrun, srun wrappers); when
    none is set, this process is rank 0 of 1 on a free local port.
    """
    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID")):
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _fail(message: str) -> None:
    """Ends the run with one line on the first rank (the others exit quietly with the same code)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run(entry: TrainingEntry, argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line, checks it, and runs Megatron's ``pretrain`` for ``entry``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _standalone_env()
    cpu_compat.apply_training()
    megatron_fixes.apply()
    try:
        exit_guard.install()  # a rank that fails must exit, or its launcher never acts
        flavor_of(argv)
        args = _parse(entry, argv)
    except ValueError as err:
        _fail(str(err))
    except AssertionError as err:  # Megatron's validate_args checks flags with bare asserts
        where = traceback.extract_tb(err.__traceback__)[-1]
        _fail(f"Megatron rejected the arguments: {str(err) or where.line} "
              f"({os.path.relpath(where.filename, os.path.dirname(os.path.dirname(torch.__file__)))}:{where.lineno})")

    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.training import pretrain

    from megatron_ualm.model_record import make_record
    from megatron_ualm.training.checkpointing import make_checkpoints_atomic
    from megatron_ualm.training.run_lock import RunLock, RunLockError
    from megatron_ualm.vocab import VocabMismatch

    lock = None
    try:
        check_directories(args)
        (entry.check_data or check_blend)(args)
        during_training.check_args(args)
        run_config = ualm_config_from_args(args)
        layout = (entry.data_layout or blend_layout)(args)
        loaded = check_checkpoint(args, run_config, layout)
        if args.save and args.rank == 0:  # after the checks: a refused run creates nothing
            lock = RunLock(args.save).acquire()
    except (RunLockError, CheckpointError, VocabMismatch, ValueError, OSError) as err:
        _fail(str(err))
    tokenizer = (layout or {}).get("tokenizer") or ((loaded or {}).get("vocab") or {}).get("tokenizer")
    _install_record(make_record(run_config, args.flavor, tokenizer,
                                codec=(loaded or {}).get("codec"), trained_by=f"megatron_ualm.{entry.name}"))
    cfg = pretrain_cfg_container_from_args(args)
    _install_ualm_logging()
    _install_validation_filter()
    during_training.install(args)
    make_checkpoints_atomic()
    try:
        pretrain(cfg, entry.datasets_provider, ModelType.encoder_or_decoder, entry.forward_step,
                 model_provider=entry.model_provider or default_model_provider)
    finally:
        if lock is not None:
            lock.release()
    if args.loss_plot and args.save and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        from megatron_ualm.training.plot import plot_metrics

        plot_metrics(os.path.join(args.save, "metrics.jsonl"), args.loss_plot)
