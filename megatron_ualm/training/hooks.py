"""The one layer between UALM and Megatron-LM's training loop (``megatron.training.pretrain``).

Megatron's loop is extended first through what it takes as arguments: the model provider, the
datasets provider and the forward step (``training.providers``; each receives this run's
``RunContext``), the extra-arguments provider, and ``args``, which every checkpoint stores (the
model description travels there). Four things UALM needs have no such hook in Megatron-Core
0.19, so this module wraps the Megatron functions below; it is the only place that does (apart
from ``compat/cpu.py``'s shims for a machine without CUDA, none of which is installed on a GPU):

1. ``training.training_log``: the loop calls it on every rank after each optimizer step and
   offers no per-iteration callback, so the ``[UALM]`` throughput line and the extensions' work
   after a step (the audio evaluation, the ``[DPO]`` log-prob line) ride on it. It also lets
   Megatron's memory report (parameter counts, theoretical footprint) print once per run: Megatron
   repeats it until the iteration passes the loaded checkpoint's, which for a fine-tuning run
   that starts from iteration N of another run is every log line up to N;
2. ``training.evaluate``: validation losses are divided by Megatron before anything can see
   them; a validation split without codebook cells would report ``0 / 0 = nan`` codebook losses,
   which are dropped here (``losses.drop_empty_codebook_losses``), and the extensions see the
   losses first (DPO leaves out the log-probs of codebooks no response held). The end-of-run
   evaluation's line per iteration becomes one line (Megatron has no flag for it);
3. ``training.get_forward_backward_func``: DPO's reference log-probs must be attached to all of a
   step's micro-batches before the pipeline schedule starts (scoring them inside the forward
   step would run a second schedule while the policy's is mid-flight on other stages);
4. the checkpoint save path (``checkpointing.save_checkpoint``, ``get_checkpoint_name``,
   ``maybe_msc``): Megatron writes checkpoints in place; ``atomic_saves`` makes them appear only
   when complete and stops a disk-full save with one line.

``install(ctx)`` puts the wrappers on in this fixed order, after taking off any left by an
earlier run in the same process (every wrapper keeps Megatron's own function as
``_ualm_original``); ``uninstall()`` takes them off at the end of the run. A run's state lives
in its ``RunContext``, made fresh by each run, never in module globals.

Extensions plug into any training entry point (``TrainingExtension``): the audio evaluation
during training (``evaluation.during_training``), and DPO's log line and reference log-probs
(``posttraining.dpo_training``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Type, TypeVar

from megatron_ualm.config import UALMConfig, config_from_megatron_args
from megatron_ualm.training import atomic_saves
from megatron_ualm.training.metrics import UALMThroughput, append_metrics, format_metrics


class TrainingExtension:
    """A feature that plugs into every training entry point; each hook is optional.

    Extensions are made fresh for each run (``TrainingEntry.extensions`` holds their classes),
    so whatever they hold ends with the run.
    """

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        """Adds the extension's flags to Megatron's parser."""

    def check_args(self, args: argparse.Namespace) -> None:
        """Checks the flags before anything is built; raises ``ValueError`` naming the flag."""

    def after_step(self, ctx: "RunContext", iteration: int) -> None:
        """Runs on every rank after each optimizer step, before the iteration's log line."""

    def after_log(self, ctx: "RunContext", iteration: int, loss_dict: dict) -> None:
        """Runs on every rank after each log line (every ``--log-interval`` iterations)."""

    def after_evaluate(self, ctx: "RunContext", losses: dict) -> dict:
        """Sees the averaged validation losses before Megatron prints and logs them; returns the
        entries to report."""
        return losses

    def before_schedule(self, ctx: "RunContext", call: dict) -> None:
        """Sees (and may replace) the arguments of each train / eval pipeline-schedule call
        (``data_iterator``, ``model``, ``num_microbatches``, ...) before it runs."""


E = TypeVar("E", bound=TrainingExtension)


@dataclass
class RunContext:
    """What one training run's providers, forward steps and hooks share.

    Attributes:
        args: Megatron's parsed arguments (the same object ``get_args()`` returns).
        entry: the entry point's name (``pretrain``, ``finetune``, ``dpo``).
        extensions: this run's extension objects.
        model_chunks: the unwrapped model chunks the model provider built, in order.
    """

    args: argparse.Namespace
    entry: str
    extensions: list = field(default_factory=list)
    model_chunks: list = field(default_factory=list)
    memory_reported: bool = False
    hook_seconds: float = 0.0
    interval_start: float = 0.0
    _config: Optional[UALMConfig] = None
    _throughput: Optional[UALMThroughput] = None

    def model_config(self) -> UALMConfig:
        """The run's model config, built once, inside the loop (Megatron attaches its process
        groups and timers to this object; checks before the loop build their own)."""
        if self._config is None:
            self._config = config_from_megatron_args(self.args)
        return self._config

    def throughput(self) -> UALMThroughput:
        """The ``[UALM]`` metrics of the run."""
        if self._throughput is None:
            a = self.args
            self._throughput = UALMThroughput(self.model_config(), a.seq_length, a.world_size, a.data_parallel_size)
        return self._throughput

    def interval_seconds(self) -> float:
        """Training time since the last ``[UALM]`` line: Megatron's ``interval-time`` timer, which
        it pauses for checkpoint saves and evaluations (read without resetting it), less the time
        the extensions' hooks took."""
        from megatron.training import get_timers

        return get_timers()("interval-time").elapsed(reset=False) - self.interval_start - self.hook_seconds

    def start_interval(self) -> None:
        """Marks the start of the next interval, after Megatron's log line: that line resets the
        timer, except on the run's first iteration (it keeps counting from the start of training)."""
        from megatron.training import get_timers

        self.interval_start = get_timers()("interval-time").elapsed(reset=False)
        self.hook_seconds = 0.0

    def count_batch(self, batch, model) -> None:
        """Counts one micro-batch for the ``[UALM]`` line (forward steps call it); evaluation's
        micro-batches (``model`` in eval mode) are not training throughput and are not counted."""
        if model.training:
            self.throughput().counters.record(batch)

    def extension(self, cls: Type[E]) -> E:
        """This run's extension of class ``cls``."""
        for ext in self.extensions:
            if isinstance(ext, cls):
                return ext
        raise LookupError(f"this run has no {cls.__name__} extension")


# ---------------------------------------------------------------------------------------------
# Wrapping and unwrapping Megatron's functions.

def _original(value: Any) -> Any:
    while hasattr(value, "_ualm_original"):
        value = value._ualm_original
    return value


def wrap(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Sets ``owner.name`` to ``make(original)``, ``original`` being Megatron's own object with
    every wrapper of this project taken off (so a second install replaces, never stacks)."""
    original = _original(getattr(owner, name))
    wrapper = make(original)
    wrapper._ualm_original = original
    setattr(owner, name, wrapper)


def unwrap(owner: Any, name: str) -> None:
    """Puts Megatron's own ``owner.name`` back."""
    setattr(owner, name, _original(getattr(owner, name)))


# Every (module, attribute) this layer may wrap, for ``uninstall``.
WRAPPED = (
    ("megatron.training.training", "training_log"),
    ("megatron.training.training", "evaluate"),
    ("megatron.training.training", "get_forward_backward_func"),
    ("megatron.training.training", "save_checkpoint"),
    ("megatron.training.checkpointing", "save_checkpoint"),
    ("megatron.training.checkpointing", "get_checkpoint_name"),
    ("megatron.training.checkpointing", "maybe_msc"),
)


def uninstall() -> None:
    """Takes every wrapper of this layer off Megatron's functions."""
    for module, name in WRAPPED:
        unwrap(importlib.import_module(module), name)


def install(ctx: RunContext) -> None:
    """Installs the wrappers for one run, in the module docstring's order (any earlier run's
    wrappers are taken off first)."""
    from megatron.training import checkpointing
    from megatron.training import training as mtraining

    uninstall()
    wrap(mtraining, "training_log", lambda original: _training_log(ctx, original))
    wrap(mtraining, "evaluate", lambda original: _evaluate(ctx, original))
    wrap(mtraining, "get_forward_backward_func", lambda original: _schedule(ctx, original))
    atomic_saves.install(checkpointing, mtraining, wrap)


# ---------------------------------------------------------------------------------------------
# The wrappers.

def _is_last_rank() -> bool:
    from megatron.training.utils import is_last_rank

    return is_last_rank()


def _training_log(ctx: RunContext, original: Callable) -> Callable:
    """Extensions' after-step work, Megatron's line, then the ``[UALM]`` line and the extensions'
    after-log work (every ``--log-interval`` iterations)."""
    from megatron.training import get_tensorboard_writer, get_wandb_writer
    from megatron.training.utils import print_rank_last

    signature = inspect.signature(original)

    def training_log(*call_args, **call_kwargs):
        call = signature.bind(*call_args, **call_kwargs)
        iteration, loss_dict, learning_rate = (call.arguments[k] for k in ("iteration", "loss_dict", "learning_rate"))
        args = ctx.args
        logs = iteration % args.log_interval == 0
        with _timed(ctx):  # an audio evaluation is not training time
            for ext in ctx.extensions:
                ext.after_step(ctx, iteration)
        if logs:
            seconds = ctx.interval_seconds()  # before Megatron's line resets the timer
        if ctx.memory_reported:
            call.arguments["report_memory_flag"] = False
        elif call.arguments.get("report_memory_flag") and (logs or call.arguments.get("is_first_iteration")):
            ctx.memory_reported = True  # Megatron prints a line, its memory block with it, here
        result = original(*call.args, **call.kwargs)
        if logs:
            ctx.start_interval()
            metrics = ctx.throughput().report(seconds)  # a collective over the data-parallel group
            print_rank_last(f" [UALM] iteration {iteration:8d} | {format_metrics(metrics)}")
            writer = get_tensorboard_writer()
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"ualm/{k}", v, iteration)
            wandb = get_wandb_writer()
            if wandb is not None:
                wandb.log({f"ualm/{k}": v for k, v in metrics.items()}, iteration)
            if args.save and _is_last_rank():
                losses = {k: float(v) for k, v in loss_dict.items()}
                append_metrics(args.save, {"iteration": iteration, "lr": learning_rate, **losses, **metrics})
            with _timed(ctx):
                for ext in ctx.extensions:
                    ext.after_log(ctx, iteration, loss_dict)
        return result

    return training_log


@contextlib.contextmanager
def _timed(ctx: RunContext):
    """Adds the block's wall time to ``ctx.hook_seconds`` (left out of the next throughput)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        ctx.hook_seconds += time.perf_counter() - start


def _evaluate(ctx: RunContext, original: Callable) -> Callable:
    """Validation reports no codebook losses where the split has no codebook cells, the
    extensions see the losses before Megatron prints them, and the evaluation at the end of a
    run prints one line where Megatron prints one per iteration."""
    from megatron.training import get_args
    from megatron.training.utils import print_rank_0

    from megatron_ualm.losses import drop_empty_codebook_losses

    signature = inspect.signature(original)

    def evaluate(*call_args, **call_kwargs):
        call = signature.bind(*call_args, **call_kwargs)
        if call.arguments.get("verbose"):
            # Megatron's final validation and test passes print "Evaluating iter i/n" for each
            # of --eval-iters (default 100): 200 console lines at the end of every run.
            args = get_args()
            eval_iters = call.arguments.get("eval_iters") or args.eval_iters
            print_rank_0(f"Evaluating on {eval_iters * args.eval_global_batch_size} samples ({eval_iters} iterations)")
            call.arguments["verbose"] = False
        total_loss_dict, collected, timelimit = original(*call.args, **call.kwargs)
        if total_loss_dict:
            total_loss_dict = drop_empty_codebook_losses(total_loss_dict)
            for ext in ctx.extensions:
                total_loss_dict = ext.after_evaluate(ctx, total_loss_dict)
        return total_loss_dict, collected, timelimit

    return evaluate


def _schedule(ctx: RunContext, original: Callable) -> Callable:
    """The pipeline schedule, shown to the extensions before each call."""

    def get_forward_backward_func(*args, **kwargs):
        schedule = original(*args, **kwargs)
        if not any(type(ext).before_schedule is not TrainingExtension.before_schedule for ext in ctx.extensions):
            return schedule

        def schedule_with_extensions(**call):
            for ext in ctx.extensions:
                ext.before_schedule(ctx, call)
            return schedule(**call)

        return schedule_with_extensions

    return get_forward_backward_func

