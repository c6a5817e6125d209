"""SFT and DPO entry points on Megatron's loop (CPU, gloo), from a pretrained checkpoint.

One uninterrupted run of each is the reference; resuming it from its iteration-3 checkpoint
(the state a kill right after that save leaves) reproduces iterations 4..6 exactly: the
losses, so also the data position. DPO: the first loss is ln 2 (the policy starts as the
reference), a few steps raise the reward margin, the frozen reference model gives the
losses of the stored (precomputed) reference log-probs, and the reference pass split over two
data-parallel ranks stores what one rank does.
"""

import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest
from ualm_testing import run_ok
from ualm_testing import torchrun as launch_cmd

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out

RUN = ["--flavor", "debug", "--seq-length", "96", "--log-interval", "1", "--eval-iters", "0", "--seed", "1234",
       "--split", "100,0,0"]


def _load(path: str, name: str):
    """A test module of another directory (tests/ has no packages), for its helpers."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pretrain_test = _load(os.path.join(os.path.dirname(__file__), os.pardir, "training", "test_pretrain.py"),
                       "ualm_test_pretrain")
resume_dir = _pretrain_test.resume_dir  # the reference's iteration-3 checkpoint alone in a new --save


def torchrun(module: str, *args: str, nproc: int = 1) -> str:
    """Runs ``python -m <module>`` in ``nproc`` torchrun processes and returns the output."""
    return run_ok(launch_cmd(nproc, "-m", module, *args))


def metrics(save_dir: str) -> dict:
    """Rows of ``metrics.jsonl`` by iteration (the last row of an iteration wins)."""
    from megatron_ualm.training.plot import read_metrics

    return {row["iteration"]: row for row in read_metrics(os.path.join(save_dir, "metrics.jsonl"))}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The starting checkpoint: two pretraining steps of the debug flavor."""
    save = str(tmp_path_factory.mktemp("base") / "ckpt")
    torchrun("megatron_ualm.pretrain", *RUN, "--synthetic-data", "--train-iters", "2", "--micro-batch-size", "2",
             "--global-batch-size", "2", "--lr", "1e-3", "--save", save, "--save-interval", "2")
    return save


def _codes(rng, frames):
    return rng.integers(0, 64, (8, frames)).tolist()


def _blend(tmp, tool, records, tokenizer_path, audio_dir) -> str:
    from megatron_ualm.data.cli import build_blend_main

    manifest = tmp / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--input", str(manifest), "--output", str(tmp / "shards"), "--tokenizer", tokenizer_path,
            "--codec", "precomputed", "--num-codebooks", "8", "--codebook-size", "64", "--frame-rate", "50",
            "--flavor", "debug", "--audio-root", audio_dir, "--records-per-shard", "10", "--no-progress"]
    assert tool(argv) == 0
    assert build_blend_main([str(tmp / "shards"), "--output", str(tmp / "blend.json")]) == 0
    return str(tmp / "blend.json")


WORDS = "dog bark rain wind engine car bird song piano guitar speech crowd water drip door slam siren bell".split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def pairs_blend(tmp_path_factory, tokenizer_path, audio_dir):
    """Preference shards: caption -> audio pairs, audio in + question -> text pairs, caption + audio pairs."""
    from megatron_ualm.data.cli import preprocess_preferences_main

    rng = np.random.default_rng(0)
    records = []
    for i in range(24):
        if i % 3 == 0:
            records.append({"prompt": _text(rng, 5), "chosen": {"codes": _codes(rng, 14)},
                            "rejected": {"codes": _codes(rng, 10)}})
        elif i % 3 == 1:
            records.append({"prompt": [{"role": "user", "audio": f"wav{i % 6}.wav"},
                                       {"role": "user", "content": _text(rng, 4)}],
                            "chosen": _text(rng, 6), "rejected": _text(rng, 3)})
        else:
            records.append({"prompt": [{"role": "system", "content": _text(rng, 3)},
                                       {"role": "user", "content": _text(rng, 4)}],
                            "chosen": [{"content": _text(rng, 4)}, {"codes": _codes(rng, 6)}],
                            "rejected": [{"content": _text(rng, 3)}, {"codes": _codes(rng, 8)}]})
    return _blend(tmp_path_factory.mktemp("pairs"), preprocess_preferences_main, records, tokenizer_path, audio_dir)


@pytest.fixture(scope="module")
def sft_blend(tmp_path_factory, tokenizer_path, audio_dir):
    """Chat shards: Reason kinds with codes, and chats with audio in."""
    from megatron_ualm.data.cli import preprocess_chat_main

    rng = np.random.default_rng(1)
    rich = {"keywords": ["rain"], "layout": "rain throughout", "description": "light rain"}
    records = []
    for i in range(30):
        if i % 3 == 0:
            records.append({"kind": "enrichment", "prompt": _text(rng, 4), "rich_caption": rich,
                            "codes": _codes(rng, 12)})
        elif i % 3 == 1:
            records.append({"kind": "self_reflection", "prompt": _text(rng, 3), "rich_caption": rich,
                            "codes_1": _codes(rng, 5), "caption_1": _text(rng, 3), "critique": _text(rng, 5),
                            "codes_2": _codes(rng, 6), "system": "plan", "critique_prompt": "heard {caption}"})
        else:
            records.append({"messages": [{"role": "user", "audio": f"wav{i % 6}.wav"},
                                         {"role": "user", "content": _text(rng, 4)},
                                         {"role": "assistant", "content": _text(rng, 8)}]})
    return _blend(tmp_path_factory.mktemp("sft"), preprocess_chat_main, records, tokenizer_path, audio_dir)


DPO = ["--train-iters", "6", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "5e-4",
       "--lr-decay-style", "constant", "--beta", "0.5", "--sft-loss-weight", "0.1", "--save-interval", "3"]


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory, base, pairs_blend):
    save = str(tmp_path_factory.mktemp("dpo") / "ckpt")
    log = torchrun("megatron_ualm.dpo", *RUN, *DPO, "--blend-file", pairs_blend, "--pretrained-checkpoint", base,
                   "--load", save, "--save", save, "--tensorboard-dir", os.path.join(save, "tb"))
    assert "reference pass" in log and "[DPO] iteration" in log and "chosen codebook_3 logp" in log
    return save


def test_dpo_starts_at_ln2_and_raises_the_margin(dpo_reference):
    rows = metrics(dpo_reference)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[1]["dpo loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[1]["reward margin"] == pytest.approx(0)
    assert rows[6]["reward margin"] > 0.05 and rows[6]["dpo loss"] < math.log(2) - 0.02
    assert rows[6]["reward accuracy"] > 0.5
    keys = {"loss", "sft loss", "chosen logp", "rejected logp", "chosen text logp", "rejected codebook_7 logp"}
    assert keys <= set(rows[6]) and rows[6]["samples_preference"] == 4
    assert rows[1]["chosen logp"] < 0 and rows[1]["chosen codebook_0 logp"] < 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(dpo_reference, "tb"))
    events.Reload()
    assert {"reward accuracy", "chosen codebook_7 logp", "sft loss"} <= set(events.Tags()["scalars"])


def test_dpo_resume_is_exact(dpo_reference, base, pairs_blend, tmp_path):
    """Resumed from iteration 3 (stored reference log-probs read, not recomputed)."""
    save = resume_dir(dpo_reference, str(tmp_path / "ckpt"))
    shutil.copytree(os.path.join(dpo_reference, "reference_logps"), os.path.join(save, "reference_logps"))
    log = torchrun("megatron_ualm.dpo", *RUN, *DPO, "--blend-file", pairs_blend, "--pretrained-checkpoint", base,
                   "--load", save, "--save", save)
    assert "reference pass" not in log
    ref, got = metrics(dpo_reference), metrics(save)
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        for key in ("loss", "reward margin", "chosen codebook_2 logp"):
            assert got[it][key] == ref[it][key], (it, key)


def test_frozen_reference_model_gives_the_stored_reference_losses(dpo_reference, base, pairs_blend, tmp_path):
    save = str(tmp_path / "ckpt")
    args = [a if a != "6" else "3" for a in DPO]  # three iterations
    torchrun("megatron_ualm.dpo", *RUN, *args, "--reference", "model", "--blend-file", pairs_blend,
             "--pretrained-checkpoint", base, "--load", save, "--save", save)
    assert not os.path.exists(os.path.join(save, "reference_logps"))
    ref, got = metrics(dpo_reference), metrics(save)
    for it in (1, 2, 3):
        for key in ("loss", "dpo loss", "reward margin"):
            assert got[it][key] == pytest.approx(ref[it][key], rel=1e-6, abs=1e-7), (it, key)


def test_reference_pass_split_over_data_parallel_ranks(dpo_reference, base, pairs_blend, tmp_path):
    """DP=2: each rank scores its share of the pairs; the stored arrays and the losses are TP1's."""
    save = str(tmp_path / "ckpt")
    args = [a if a != "6" else "3" for a in DPO]
    torchrun("megatron_ualm.dpo", *RUN, *args, "--blend-file", pairs_blend, "--pretrained-checkpoint", base,
             "--load", save, "--save", save, nproc=2)
    for name in sorted(os.listdir(os.path.join(dpo_reference, "reference_logps"))):
        if name.endswith(".npy"):
            want = np.load(os.path.join(dpo_reference, "reference_logps", name))
            got = np.load(os.path.join(save, "reference_logps", name))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    ref, got = metrics(dpo_reference), metrics(save)
    for it in (1, 2, 3):
        assert got[it]["loss"] == pytest.approx(ref[it]["loss"], rel=1e-5), it


SFT = ["--train-iters", "6", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
       "--save-interval", "3"]


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, base, sft_blend):
    save = str(tmp_path_factory.mktemp("sft") / "ckpt")
    torchrun("megatron_ualm.finetune", *RUN, *SFT, "--blend-file", sft_blend, "--pretrained-checkpoint", base,
             "--load", save, "--save", save)
    return save


def test_sft_runs_from_the_pretrained_checkpoint_and_resumes_exactly(sft_reference, base, sft_blend, tmp_path):
    ref = metrics(sft_reference)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6] and all(r["samples_chat"] == 4 for r in ref.values())
    assert {f"codebook_{k} loss" for k in range(8)} <= set(ref[1])
    save = resume_dir(sft_reference, str(tmp_path / "ckpt"))
    torchrun("megatron_ualm.finetune", *RUN, *SFT, "--blend-file", sft_blend, "--pretrained-checkpoint", base,
             "--load", save, "--save", save)
    got = metrics(save)
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        for key in ("lm loss", "text loss", "codebook_5 loss"):  # a codebook's loss is NaN in a batch without audio
            assert got[it][key] == ref[it][key] or (math.isnan(got[it][key]) and math.isnan(ref[it][key])), (it, key)
