"""What every UALM training entry point shares around Megatron-LM's ``pretrain()`` loop.

``pretrain``, ``finetune`` and ``dpo`` differ in their data, forward step, flags and extensions
(a ``TrainingEntry``); ``run(entry)`` does the rest, in the order a run meets it:

1. the command line: the backbone flags of the model the run starts from (the checkpoint it
   resumes or starts from, else the flavor), the CPU flags (gloo, no CUDA fusions) or the GPU
   fallbacks, then the user's flags (which win, and are checked against the checkpoint), parsed
   by Megatron with UALM's groups and those of the entry and its extensions;
2. checks before anything is built (``training.checks``: directories, a resumable
   ``--finetune``, the data, the extensions' flags, the checkpoint to load against this run),
   each ending the run with one line that says what to do; then the ``--save`` directory is
   locked for this run (``run_lock``);
3. a fresh ``RunContext``, the model description in ``args`` (so every checkpoint Megatron
   saves carries it) and the hook layer (``training.hooks``) installed;
4. Megatron's ``pretrain`` with the entry's providers bound to the context; at the end the
   hooks come off, the lock is released and ``--loss-plot`` is drawn.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_ualm.compat import cpu as cpu_compat
from megatron_ualm.compat import megatron_fixes, quiet
from megatron_ualm.errors import CheckpointError
from megatron_ualm.launch import program_name
from megatron_ualm.training import checks, exit_guard, hooks, providers
from megatron_ualm.training.arguments import BaseModel, add_ualm_args, base_model


@dataclass(frozen=True)
class TrainingEntry:
    """One training entry point.

    Attributes:
        name: the program, for messages (``pretrain``, ``finetune``, ``dpo``).
        datasets_provider: Megatron's ``train_valid_test_dataset_provider``, taking the
            ``RunContext`` first.
        forward_step: Megatron's ``forward_step_func``, taking the ``RunContext`` first; call
            ``ctx.count_batch(batch, model)`` on each micro-batch so the ``[UALM]`` line counts it.
        model_provider: Megatron's model provider, taking the ``RunContext`` first (default: one
            UALM stage with the freezing policy of ``--freeze``).
        add_args: adds the entry point's own flags to Megatron's parser (after UALM's).
        check_data: checks the run's data before the model is built; raises ``ValueError`` /
            ``OSError`` with a message naming the file. Default: the blend file and its shards.
        data_layout: the token-id layout the run's data implies (``vocab.vocab_layout``), None
            when unknown; compared with the checkpoint to load. Default: from ``--blend-file``.
        extensions: ``TrainingExtension`` classes, made fresh for each run.
    """

    name: str
    datasets_provider: Callable
    forward_step: Callable
    model_provider: Callable = providers.model_provider
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    check_data: Callable[[argparse.Namespace], None] = checks.check_blend
    data_layout: Callable[[argparse.Namespace], Optional[dict]] = checks.blend_layout
    extensions: tuple = ()


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


def _console_argv() -> list[str]:
    """Megatron's console, cut to what a person acts on (the command line may turn it back on):
    no INFO logs (``--logging-level 20`` shows them), no one_logger attempt where it is not
    installed (an NVIDIA-internal package; Megatron points at an internal wiki for it)."""
    import importlib.util

    argv = ["--logging-level", "30"]
    if importlib.util.find_spec("one_logger") is None:
        argv.append("--no-one-logger")
    return argv


ARGUMENTS_FILE = "megatron_arguments.txt"
_DUMP_START, _DUMP_END = "------------------------ arguments ------------------------", "end of arguments"


def _split_argument_dump(text: str) -> tuple[str, str]:
    """(Megatron's argument dump, everything else it printed) of the parser's output."""
    lines, dump, rest, inside = text.splitlines(keepends=True), [], [], False
    for line in lines:
        if line.startswith(_DUMP_START):
            inside = True
        (dump if inside else rest).append(line)
        if inside and _DUMP_END in line:
            inside = False
    return "".join(dump), "".join(rest)


def _parse(entry: TrainingEntry, extensions: list, base: BaseModel, argv: Sequence[str]) -> argparse.Namespace:
    """Megatron's parse and validation of the full command line; its argument dump (about a
    thousand lines) is kept on ``args.ualm_argument_dump`` for the run's directory, not printed."""
    from megatron.training.arguments import parse_and_validate_args

    sys.argv = ([program_name(), "--flavor", base.flavor] + base.argv + _device_argv()
                + _console_argv() + list(argv))
    # The level Megatron applies once initialised, applied now: parsing and the checks log too.
    level = argparse.ArgumentParser(add_help=False)
    level.add_argument("--logging-level", type=int)
    logging.getLogger().setLevel(level.parse_known_args(sys.argv[1:])[0].logging_level)

    def extra(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_ualm_args(parser)
        for ext in extensions:
            ext.add_args(parser)
        if entry.add_args is not None:
            entry.add_args(parser)
        return parser

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            args = parse_and_validate_args(extra_args_provider=extra)
    finally:
        dump, rest = _split_argument_dump(printed.getvalue())
        sys.stdout.write(rest)  # --help, and Megatron's notes on the flags
        sys.stdout.flush()
    args.ualm_base_model = base.description  # the audio and vocabulary fields no Megatron flag carries
    args.ualm_argument_dump = dump
    return args


def _keep_argument_dump(args: argparse.Namespace) -> None:
    """Writes Megatron's argument dump beside the run's checkpoints (rank 0), says where."""
    dump = getattr(args, "ualm_argument_dump", "")
    del args.ualm_argument_dump  # not a flag: checkpoints store args
    if not dump or args.rank != 0:
        return
    if args.save:
        from megatron_ualm.files import atomic_write

        path = atomic_write(os.path.join(args.save, ARGUMENTS_FILE), dump)
        print(f"> Megatron's arguments (every flag's value): {path}", flush=True)
    else:
        print(f"> Megatron's arguments are not printed; a run with --save keeps them in <save>/{ARGUMENTS_FILE}",
              flush=True)


# Megatron's argument validation checks many flags with bare asserts; the source line is all it
# says. The ones a user meets first, in words (keyed by that line; others are shown as they are).
MEGATRON_ASSERTIONS = {
    "args.save_interval is not None": "--save needs --save-interval N: a checkpoint every N iterations (and one at "
                                      "the end of the run)",
    "args.save_interval > 0": "--save-interval must be a positive number of iterations",
    "args.save_retain_interval % args.save_interval == 0": "--save-retain-interval must be a multiple of "
                                                           "--save-interval",
    "not args.bf16": "--fp16 and --bf16 exclude each other: give one of them",
    "not args.fp16": "--fp16 and --bf16 exclude each other: give one of them",
    "args.micro_batch_size > 0": "--micro-batch-size must be at least 1",
    "args.global_batch_size > 0": "--global-batch-size must be at least 1",
    "args.min_lr <= args.lr": "--min-lr must not exceed --lr",
    "args.hidden_size % args.num_attention_heads == 0": "--hidden-size must be a multiple of --num-attention-heads "
                                                        "(or give --kv-channels)",
    "args.max_position_embeddings >= args.decoder_seq_length": "--decoder-seq-length exceeds "
                                                               "--max-position-embeddings",
    "args.log_memory_interval % args.log_interval == 0": "--log-memory-interval must be a multiple of --log-interval",
}


def megatron_rejection(err: AssertionError) -> str:
    """One line for an assertion of Megatron's argument validation: what to change, and where."""
    where = traceback.extract_tb(err.__traceback__)[-1]
    source = (where.line or "").strip().removeprefix("assert ").strip()
    site = f"{os.path.relpath(where.filename, os.path.dirname(os.path.dirname(torch.__file__)))}:{where.lineno}"
    if source in MEGATRON_ASSERTIONS:
        return f"{MEGATRON_ASSERTIONS[source]} (Megatron's check at {site})"
    return f"Megatron rejected the arguments: {str(err) or where.line} ({site})"


def _fail(message: str) -> None:
    """Ends the run with one line on the first rank (the others exit quietly with the same code)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _interrupted(args: argparse.Namespace) -> None:
    """Ctrl-C (SIGINT to the job's processes): one line on the first rank, naming what a rerun
    resumes from, instead of every rank's traceback; exit status 130, as a shell gives.

    A save the signal cut short stays an ``iter_N.partial`` folder that nothing loads
    (``atomic_saves``); the tracker still names the last complete checkpoint.
    """
    from megatron_ualm.checkpoint_format import read_tracker

    exit_guard.arm("SIGINT", quiet=True)  # data-loader workers, a save's threads: a bounded exit here too
    if os.environ.get("RANK", "0") == "0":
        folder = read_tracker(args.save) if args.save else None
        if not args.save:
            where = "nothing was saved (no --save)"
        elif folder is None:
            where = f"no checkpoint in {args.save} yet"
        elif os.path.abspath(args.load or "") == os.path.abspath(args.save):
            where = f"the last checkpoint is {args.save}/{folder}; the same command resumes from it"
        else:
            where = f"the last checkpoint is {args.save}/{folder}; resume with --load {args.save}"
        print(f"interrupted (SIGINT): {where}", file=sys.stderr, flush=True)
    raise SystemExit(130)


def _bind(ctx: hooks.RunContext, function: Callable) -> Callable:
    """``function`` with the run's context as its first argument (Megatron's attributes kept)."""
    bound = functools.partial(function, ctx)
    if getattr(function, "is_distributed", False):
        bound.is_distributed = True
    return bound


def run(entry: TrainingEntry, argv: Optional[Sequence[str]] = None) -> None:
    """Parses the command line, checks it, and runs Megatron's ``pretrain`` for ``entry``."""
    from megatron_ualm.launch import launched, world_of_one

    quiet.install()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not launched():  # ``python -m megatron_ualm.<entry>`` by hand: rank 0 of 1
        os.environ.update(world_of_one())
    cpu_compat.apply_training()
    megatron_fixes.apply()
    extensions = [cls() for cls in entry.extensions]
    try:
        exit_guard.install()  # a rank that fails must exit, or its launcher never acts
        args = _parse(entry, extensions, base_model(argv), argv)
    except (ValueError, CheckpointError) as err:
        _fail(str(err))
    except AssertionError as err:  # Megatron's validate_args checks flags with bare asserts
        _fail(megatron_rejection(err))

    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.training import pretrain

    from megatron_ualm.checkpoint_format import ARGS_ATTRIBUTE, describe_model
    from megatron_ualm.config import config_from_megatron_args
    from megatron_ualm.training.run_lock import RunLock, RunLockError
    from megatron_ualm.vocab import VocabMismatch

    lock = None
    try:
        checks.check_schedule(args)
        checks.check_directories(args)
        checks.check_resumable(args)
        entry.check_data(args)
        for ext in extensions:
            ext.check_args(args)
        run_config = config_from_megatron_args(args)
        layout = entry.data_layout(args)
        loaded = checks.check_checkpoint(args, run_config, layout)
        checks.check_data_fits_model(args, run_config)
        if args.save and args.rank == 0:  # after the checks: a refused run creates nothing
            lock = RunLock(args.save).acquire()
        _keep_argument_dump(args)
    except (RunLockError, CheckpointError, VocabMismatch, ValueError, OSError) as err:
        _fail(str(err))
    tokenizer = (layout or {}).get("tokenizer") or ((loaded or {}).get("vocab") or {}).get("tokenizer")
    setattr(args, ARGS_ATTRIBUTE, describe_model(run_config, args.flavor, tokenizer, codec=(loaded or {}).get("codec"),
                                                 trained_by=f"megatron_ualm.{entry.name}"))
    ctx = hooks.RunContext(args, entry.name, extensions)
    cfg = pretrain_cfg_container_from_args(args)
    hooks.install(ctx)
    try:
        pretrain(cfg, _bind(ctx, entry.datasets_provider), ModelType.encoder_or_decoder, _bind(ctx, entry.forward_step),
                 model_provider=_bind(ctx, entry.model_provider))
    except KeyboardInterrupt:
        _interrupted(args)
    finally:
        hooks.uninstall()
        if lock is not None:
            lock.release()
    if args.loss_plot and args.save and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        from megatron_ualm.training.plot import plot_metrics

        plot_metrics(os.path.join(args.save, "metrics.jsonl"), args.loss_plot)
