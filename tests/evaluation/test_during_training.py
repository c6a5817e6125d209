"""Audio evaluation inside a pretraining run: the hook's rows, clips and CLAP are written, and the
training losses are bit-identical to a run without the hook (dropout on, so a disturbed RNG
stream or a model left in eval mode would change them)."""

import json
import os

import numpy as np
import pytest

from megatron_ualm.evaluation import during_training
from ualm_testing import run_ok, torchrun

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out


def _rows(save):
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _pretrain(save, *extra):
    args = ["--flavor", "debug", "--synthetic-data", "--train-iters", "4", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--seq-length", "64", "--lr", "1e-3", "--log-interval", "1",
            "--eval-iters", "0", "--seed", "1234", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
            "--save", str(save), "--save-interval", "100", *extra]
    return run_ok(torchrun(1, "-m", "megatron_ualm.pretrain", *args))


@pytest.fixture(scope="module")
def eval_inputs(decoding_inputs, tiny_backbones):
    return ["--eval-prompts", decoding_inputs["prompts"], "--eval-audio-interval", "2",
            "--eval-tokenizer", decoding_inputs["tokenizer"], "--eval-codec", decoding_inputs["codec"],
            "--eval-clap-path", tiny_backbones["clap"], "--eval-audio-seconds", "0.2"]


def test_hook_leaves_training_bit_identical(tmp_path, eval_inputs):
    _pretrain(tmp_path / "off")
    log = _pretrain(tmp_path / "on", *eval_inputs)
    off, on = _rows(tmp_path / "off"), _rows(tmp_path / "on")
    train_on = [r for r in on if not r.get("eval_audio")]
    assert [r["lm loss"] for r in train_on] == [r["lm loss"] for r in off]  # bit-identical, every iteration
    assert [r["iteration"] for r in off] == [1, 2, 3, 4]
    evals = [r for r in on if r.get("eval_audio")]
    assert [r["iteration"] for r in evals] == [2, 4]
    for r in evals:
        assert set(r["eval_clap_per_prompt"]) <= {"rain", "dog"} and np.isfinite(r["eval_clap"])
        assert set(r["eval_audio_frames"]) == {"rain", "dog"}
    # The eval row precedes its iteration's training row, so "last row per iteration" readers keep the losses.
    assert on.index(evals[0]) < on.index(next(r for r in on if r["iteration"] == 2 and "lm loss" in r))
    wavs = sorted(os.listdir(tmp_path / "on" / "eval_audio" / "iter_0000002"))
    assert wavs and set(wavs) <= {"rain.wav", "dog.wav"}
    assert "[UALM eval] iteration        2" in log


def test_flags_are_checked(tmp_path):
    import argparse

    parser = during_training.add_args(argparse.ArgumentParser())
    args = parser.parse_args(["--eval-audio-interval", "5"])
    with pytest.raises(ValueError, match="needs --eval-prompts"):
        during_training.check_args(args)
    args = parser.parse_args(["--eval-audio-interval", "5", "--eval-prompts", str(tmp_path / "no.jsonl"),
                              "--eval-tokenizer", "t", "--eval-codec", "c"])
    with pytest.raises(ValueError, match="--eval-prompts .*no.jsonl does not exist"):
        during_training.check_args(args)
    during_training.check_args(parser.parse_args([]))  # off: nothing to check


def test_preserved_rng_restores_every_stream(parallel_world_of_one):
    import random

    import torch
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draw():
        with tracker.fork():
            t = torch.rand(3)
        return random.random(), float(np.random.rand()), torch.rand(3).tolist(), t.tolist()

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             {k: v.clone() for k, v in tracker.get_states().items()})
    want = draw()
    random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2]), tracker.set_states(state[3])
    with during_training.preserved_rng():
        draw(), draw()  # the evaluation consumes every stream
    assert draw() == want
