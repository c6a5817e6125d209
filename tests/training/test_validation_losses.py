"""Validation without codebook cells (a split with no generation rows) reports no codebook losses
instead of Megatron's ``0 / 0 = nan``; a real NaN is never hidden."""

import math

import torch

from megatron_ualm.losses import drop_empty_codebook_losses


def _megatron_division(entries):
    """What Megatron's evaluate does with the summed ``[sum, count]`` report entries."""
    return {k: torch.tensor(s) / torch.tensor(c) for k, (s, c) in entries.items()}


def test_codebooks_without_cells_are_left_out():
    losses = _megatron_division({"lm loss": (12.0, 4.0), "text loss": (12.0, 4.0),
                                 "codebook_0 loss": (0.0, 0.0), "codebook_1 loss": (0.0, 0.0)})
    assert math.isnan(float(losses["codebook_0 loss"]))
    assert sorted(drop_empty_codebook_losses(losses)) == ["lm loss", "text loss"]


def test_codebooks_with_cells_and_real_nans_are_kept():
    losses = _megatron_division({"lm loss": (20.0, 8.0), "text loss": (12.0, 4.0), "codebook_0 loss": (8.0, 4.0)})
    assert drop_empty_codebook_losses(losses) == losses
    diverged = {"lm loss": torch.tensor(float("nan")), "codebook_0 loss": torch.tensor(float("nan"))}
    assert sorted(drop_empty_codebook_losses(diverged)) == ["codebook_0 loss", "lm loss"]


def test_the_training_loop_filters_megatron_evaluate(monkeypatch):
    import argparse

    from megatron.training import training as mtraining

    from megatron_ualm.training import hooks

    returned = _megatron_division({"lm loss": (3.0, 1.0), "codebook_3 loss": (0.0, 0.0)})
    monkeypatch.setattr(mtraining, "evaluate", lambda *a, **k: (dict(returned), None, False))
    ctx = hooks.RunContext(argparse.Namespace(), "test")
    try:
        hooks.install(ctx)
        hooks.install(ctx)  # installing twice wraps once
        assert list(mtraining.evaluate()[0]) == ["lm loss"]
        assert mtraining.evaluate._ualm_original(None)[0].keys() == returned.keys()
        monkeypatch.setattr(mtraining, "evaluate", lambda *a, **k: (None, None, True))  # time limit hit
        hooks.install(ctx)
        assert mtraining.evaluate() == (None, None, True)
    finally:
        hooks.uninstall()


def test_the_final_evaluation_prints_one_line_not_one_per_iteration(monkeypatch, capsys):
    """Megatron's end-of-run validation and test passes print a line per ``--eval-iters``
    iteration (200 lines at the default 100); the loop prints one line and evaluates the same."""
    import argparse
    import inspect

    from megatron.training import global_vars
    from megatron.training import training as mtraining

    from megatron_ualm.training import hooks

    seen = []

    def megatron_evaluate(forward_step_func, data_iterator, model, process_non_loss_data_func, config,
                          verbose=False, non_loss_data_func=None, eval_iters=None):
        seen.append((verbose, eval_iters))
        return {"lm loss": torch.tensor(1.0)}, None, False

    assert list(inspect.signature(megatron_evaluate).parameters) == list(
        inspect.signature(mtraining.evaluate).parameters)[:8], "Megatron's evaluate changed its arguments"
    monkeypatch.setattr(mtraining, "evaluate", megatron_evaluate)
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", argparse.Namespace(eval_iters=100, eval_global_batch_size=8))
    try:
        hooks.install(hooks.RunContext(argparse.Namespace(), "test"))
        mtraining.evaluate(None, None, [], None, None, True)  # the final passes, verbose positional
        mtraining.evaluate(None, None, [], None, None, verbose=True, eval_iters=5)
        mtraining.evaluate(None, None, [], None, None)  # the periodic passes print nothing
    finally:
        hooks.uninstall()
    assert seen == [(False, None), (False, 5), (False, None)]
    out = capsys.readouterr().out
    assert out.splitlines() == ["Evaluating on 800 samples (100 iterations)", "Evaluating on 40 samples (5 iterations)"]
