"""The hook layer around Megatron's loop (``training.hooks``): one wrapper per Megatron function
whatever ran before in the process, taken off at the end of a run, and the extensions called in
their documented order."""

import argparse
import importlib

import pytest

from megatron_ualm.training import hooks


def _megatron_functions():
    return {(m, n): getattr(importlib.import_module(m), n) for m, n in hooks.WRAPPED}


class _Counts:
    """The ``[UALM]`` metrics of a run whose throughput is not under test."""

    def __init__(self):
        self.seconds = []

    def report(self, seconds):
        self.seconds.append(seconds)
        return {"tokens_per_sec_per_gpu": 1.0}


class _Recorder(hooks.TrainingExtension):
    def __init__(self, calls, tag):
        self.calls, self.tag = calls, tag

    def after_step(self, ctx, iteration):
        self.calls.append(f"{self.tag} after_step {iteration}")

    def after_log(self, ctx, iteration, loss_dict):
        self.calls.append(f"{self.tag} after_log {iteration}")


def _context(extensions):
    ctx = hooks.RunContext(argparse.Namespace(log_interval=2, save=None), "test", list(extensions))
    ctx._throughput = _Counts()
    ctx.interval_seconds, ctx.start_interval = lambda: 10.0, lambda: None  # Megatron's timer, outside a run
    return ctx


def test_install_replaces_and_uninstall_restores(monkeypatch):
    from megatron.training import training as mtraining

    megatron_own = _megatron_functions()
    try:
        hooks.install(_context([]))
        first = _megatron_functions()
        assert all(first[k] is not megatron_own[k] for k in megatron_own), "every listed function is wrapped"
        hooks.install(_context([]))  # a second run in the same process
        for key, wrapper in _megatron_functions().items():
            assert wrapper._ualm_original is megatron_own[key], f"{key} stacked on an earlier run's wrapper"
        assert mtraining.get_forward_backward_func._ualm_original is megatron_own[
            ("megatron.training.training", "get_forward_backward_func")]
    finally:
        hooks.uninstall()
    assert _megatron_functions() == megatron_own


def test_a_dpo_run_leaves_nothing_for_the_next_run(monkeypatch, capsys):
    """After a run with a log-line extension, a plain run in the same process logs no stale line."""
    from megatron.training import training as mtraining

    calls = []

    def megatron_line(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag, *rest):
        calls.append("megatron line")

    monkeypatch.setattr(mtraining, "training_log", megatron_line)
    try:
        hooks.install(_context([_Recorder(calls, "dpo")]))
        mtraining.training_log({}, {}, 0.1, 2, 1.0, True)
        assert calls == ["dpo after_step 2", "megatron line", "dpo after_log 2"]
        calls.clear()
        hooks.install(_context([_Recorder(calls, "eval")]))
        mtraining.training_log({}, {}, 0.1, 3, 1.0, True)  # not a log iteration: after_step only
        mtraining.training_log({}, {}, 0.1, 4, 1.0, True)
        assert calls == ["eval after_step 3", "megatron line", "eval after_step 4", "megatron line", "eval after_log 4"]
    finally:
        hooks.uninstall()
    assert "[UALM] iteration        4" in capsys.readouterr().out


def test_megatron_reports_memory_once_per_run(monkeypatch):
    """Megatron repeats its memory block until the iteration passes the loaded checkpoint's (every
    log line of a fine-tuning run that starts from iteration N of another run): once is enough.
    Its first line is the first iteration's, whatever the log interval."""
    from megatron.training import training as mtraining

    printed = []

    def megatron_line(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag, *rest,
                      pg_collection=None, is_first_iteration=False):
        if report_memory_flag and (iteration % 2 == 0 or is_first_iteration):  # Megatron's own condition
            printed.append(iteration)
        return report_memory_flag  # Megatron keeps asking while the loaded iteration is ahead

    monkeypatch.setattr(mtraining, "training_log", megatron_line)
    try:
        for first in (1, 4):  # a fresh run, then one resumed after iteration 3
            hooks.install(_context([]))
            flag = True
            for iteration in range(first, first + 5):
                flag = mtraining.training_log({}, {}, 0.1, iteration, 1.0, flag, 0, pg_collection=None,
                                              is_first_iteration=iteration == first)
            assert printed == [first], printed  # once, at the run's first iteration
            printed.clear()
        hooks.install(_context([]))  # a caller that never says which iteration is first
        flag = True
        for iteration in range(1, 6):
            flag = mtraining.training_log({}, {}, 0.1, iteration, 1.0, flag, 0, pg_collection=None)
        assert printed == [2], printed  # the first log line
    finally:
        hooks.uninstall()


def test_schedule_is_shown_to_extensions_only_when_one_wants_it(monkeypatch):
    from megatron.training import training as mtraining

    def schedule(**call):
        return call["data_iterator"]

    monkeypatch.setattr(mtraining, "get_forward_backward_func", lambda *a, **k: schedule)

    class Doubler(hooks.TrainingExtension):
        def before_schedule(self, ctx, call):
            call["data_iterator"] = [2 * x for x in call["data_iterator"]]

    try:
        hooks.install(_context([]))
        assert mtraining.get_forward_backward_func() is schedule  # nothing to show: Megatron's own
        hooks.install(_context([Doubler()]))
        assert mtraining.get_forward_backward_func()(data_iterator=[1, 2]) == [2, 4]
    finally:
        hooks.uninstall()


def test_run_context_finds_its_extensions():
    calls = []
    ctx = _context([_Recorder(calls, "a")])
    assert ctx.extension(_Recorder) is ctx.extensions[0]
    class Other(hooks.TrainingExtension):
        pass

    with pytest.raises(LookupError, match="no Other extension"):
        ctx.extension(Other)


def test_importing_the_package_changes_nothing_outside_it():
    import subprocess
    import sys

    code = ("import warnings; before = warnings.showwarning; import megatron_ualm, megatron_ualm.api, "
            "megatron_ualm.data.cli, megatron_ualm.training.loop; assert warnings.showwarning is before")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"TORCHDYNAMO_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]



def test_throughput_time_is_megatron_interval_time_without_the_extensions_hooks(monkeypatch):
    """The ``[UALM]`` tokens/s divide by Megatron's ``interval-time`` (which it pauses for saves
    and evaluations, so the line after a checkpoint save is not a fraction of the others), less
    what the extensions' hooks took (an audio evaluation during training is not training time).
    Megatron's line resets that timer except on the run's first iteration."""
    import time

    from megatron.training import global_vars
    from megatron.training import training as mtraining

    class _SlowHook(hooks.TrainingExtension):
        def after_step(self, ctx, iteration):
            if iteration == 2:
                time.sleep(0.3)

        def after_log(self, ctx, iteration, loss_dict):
            time.sleep(0.2)

    class _Timer:
        def __init__(self):
            self.value, self.resets = 0.0, 0

        def elapsed(self, reset=True, barrier=False):
            value = self.value
            if reset:
                self.value, self.resets = 0.0, self.resets + 1
            return value

    timer = _Timer()
    monkeypatch.setattr(global_vars, "_GLOBAL_TIMERS", lambda name, log_level=None: timer)

    def megatron_line(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag, *rest):
        timer.elapsed(reset=iteration != 1)  # read at each log line, reset except on the first iteration

    monkeypatch.setattr(mtraining, "training_log", megatron_line)
    ctx = hooks.RunContext(argparse.Namespace(log_interval=1, save=None), "test", [_SlowHook()])
    ctx._throughput = counts = _Counts()
    try:
        hooks.install(ctx)
        for iteration in (1, 2, 3, 4):
            # the step's 5 s, plus the hooks that ran inside the timer: iteration 2's after_step,
            # and every after_log, which runs after Megatron's line (so in the next interval)
            timer.value += 5.0 + (0.3 if iteration == 2 else 0) + (0.2 if iteration > 1 else 0)
            mtraining.training_log({}, {}, 0.1, iteration, 1.0, False)
    finally:
        hooks.uninstall()
    assert timer.resets == 3
    assert counts.seconds == pytest.approx([5.0] * 4, abs=0.05), counts.seconds


def test_evaluation_micro_batches_are_not_counted_as_training_throughput():
    """Megatron's evaluation runs the same forward step with the model in eval mode: its rows are
    neither training tokens nor training FLOPs (they would inflate the line after a validation)."""
    import types

    import torch

    from megatron_ualm.training.metrics import StepCounters

    ctx = _context([])
    ctx._throughput = types.SimpleNamespace(counters=StepCounters())
    batch = types.SimpleNamespace(tokens=torch.zeros(3, 8), audio_in_lengths=None, family_counts={"text": 3})
    model = torch.nn.Linear(1, 1)
    ctx.count_batch(batch, model)
    model.eval()
    ctx.count_batch(batch, model)
    assert ctx._throughput.counters.sequences == 3 and ctx._throughput.counters.families == {"text": 3}


def test_the_ualm_line_prints_tokens_per_second_as_a_whole_number():
    """Throughput reads the same at 6,394 and at 10,320 tokens/s (``.4g`` gave ``1.032e+04``)."""
    from megatron_ualm.training.metrics import format_metrics

    line = format_metrics({"tokens_per_sec_per_gpu": 10320.4, "ualm_tflops_per_gpu": 0.013184,
                           "encoder_windows": 22, "samples_text": 11})
    assert line == "tokens_per_sec_per_gpu: 10320 | ualm_tflops_per_gpu: 0.01318 | encoder_windows: 22 | samples_text: 11"
    assert format_metrics({"tokens_per_sec_per_gpu": 6394.2, "ualm_tflops_per_gpu": 412.345}) == (
        "tokens_per_sec_per_gpu: 6394 | ualm_tflops_per_gpu: 412.3")
