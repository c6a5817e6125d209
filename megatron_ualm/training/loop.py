"""What every UALM training entry point shares around Megatron-LM's ``pretrain()`` loop.

``pretrain``, ``finetune`` and ``dpo`` differ in their data, forward step, flags and extensions
(a ``TrainingEntry``); ``run(entry)`` does the rest, in the order a run meets it:

1. the command line: the flavor's backbone flags, the CPU flags (gloo, no CUDA fusions) or the
   GPU fallbacks, then the user's flags (which win), parsed by Megatron with UALM's groups and
   those of the entry and its extensions;
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
import functools
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_ualm.compat import cpu as cpu_compat
from megatron_ualm.compat import megatron_fixes, quiet
from megatron_ualm.errors import CheckpointError
from megatron_ualm.training import checks, hooks, providers
from megatron_ualm.training.arguments import add_ualm_args, flavor_argv, flavor_of


@dataclass(frozen=True)
class TrainingEntry:
    """One training entry point.

    Attributes:
        name: the program, for messages (``pretrain``, ``finetune``, ``dpo``).
        datasets_provider: Megatron's ``train_valid_test_dataset_provider``, taking the
            ``RunContext`` first.
        forward_step: Megatron's ``forward_step_func``, taking the ``RunContext`` first; call
            ``ctx.count_batch(batch)`` on each micro-batch so the ``[UALM]`` line counts it.
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


def _parse(entry: TrainingEntry, extensions: list, argv: Sequence[str]) -> argparse.Namespace:
    from megatron.training.arguments import parse_and_validate_args

    flavor = flavor_of(argv)
    sys.argv = [f"python -m megatron_ualm.{entry.name}"] + flavor_argv(flavor) + _device_argv() + list(argv)

    def extra(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        add_ualm_args(parser)
        for ext in extensions:
            ext.add_args(parser)
        if entry.add_args is not None:
            entry.add_args(parser)
        return parser

    return parse_and_validate_args(extra_args_provider=extra)


def _fail(message: str) -> None:
    """Ends the run with one line on the first rank (the others exit quietly with the same code)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


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
        flavor_of(argv)
        args = _parse(entry, extensions, argv)
    except ValueError as err:
        _fail(str(err))
    except AssertionError as err:  # Megatron's validate_args checks flags with bare asserts
        where = traceback.extract_tb(err.__traceback__)[-1]
        _fail(f"Megatron rejected the arguments: {str(err) or where.line} "
              f"({os.path.relpath(where.filename, os.path.dirname(os.path.dirname(torch.__file__)))}:{where.lineno})")

    from megatron.core.enums import ModelType
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.training import pretrain

    from megatron_ualm.checkpoint_format import ARGS_ATTRIBUTE, describe_model
    from megatron_ualm.config import config_from_megatron_args
    from megatron_ualm.training.run_lock import RunLock, RunLockError
    from megatron_ualm.vocab import VocabMismatch

    lock = None
    try:
        checks.check_directories(args)
        checks.check_resumable(args)
        entry.check_data(args)
        for ext in extensions:
            ext.check_args(args)
        run_config = config_from_megatron_args(args)
        layout = entry.data_layout(args)
        loaded = checks.check_checkpoint(args, run_config, layout)
        if args.save and args.rank == 0:  # after the checks: a refused run creates nothing
            lock = RunLock(args.save).acquire()
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
    finally:
        hooks.uninstall()
        if lock is not None:
            lock.release()
    if args.loss_plot and args.save and torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        from megatron_ualm.training.plot import plot_metrics

        plot_metrics(os.path.join(args.save, "metrics.jsonl"), args.loss_plot)
