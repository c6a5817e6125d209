"""What a training run checks before it builds anything, and what its checkpoints say of themselves.

A short run on a text blend tokenised with tokenizer A is the shared checkpoint. Against it:
resuming on data of tokenizer B, generating or exporting with tokenizer B, a wrong --flavor, and
the common user errors (missing blend file, wrong encoder path, a --save of another run, a --load
whose iteration is missing, a --save in use) each end in one line, without a traceback.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_ualm.training.run_lock import LOCK_NAME, RunLock, RunLockError

COMMON = ["--flavor", "debug", "--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "64",
          "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--seed", "1"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    return env


def run(*argv, module="megatron_ualm.pretrain", timeout=600):
    """``python -m <module> argv`` in a world of one (no launcher: its own traceback is not ours)."""
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout,
                          env=_env())


def one_line_error(proc, *needles):
    """The program failed with a single ``error:`` line that contains every needle."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tokenizer(path, words, size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words[i:i + 5]) for i in range(len(words) - 5)],
                            trainers.BpeTrainer(vocab_size=size, special_tokens=["[UNK]"], show_progress=False))
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizers A and B, a text blend of each, and a 2-iteration checkpoint trained on blend A."""
    from megatron_ualm.data.cli import build_blend_main, preprocess_text_main

    root = tmp_path_factory.mktemp("checks")
    words_a = ("the dog runs in the garden and a cat sleeps under the tree at night " * 40).split()
    words_b = ("rain falls on a tin roof while an engine hums far away in the valley " * 40).split()
    out = {"root": root}
    for name, words, size in (("a", words_a, 120), ("b", words_b, 110)):
        tok = _tokenizer(str(root / f"tok_{name}"), words, size)
        manifest = root / f"text_{name}.jsonl"
        manifest.write_text("".join(json.dumps({"text": " ".join(words[i:i + 12])}) + "\n" for i in range(0, 400, 4)))
        shards = str(root / f"shards_{name}")
        assert preprocess_text_main(["--input", str(manifest), "--output", shards, "--tokenizer", tok,
                                     "--no-progress"]) == 0
        assert build_blend_main([shards, "--output", str(root / f"blend_{name}.json")]) == 0
        out[f"tok_{name}"], out[f"blend_{name}"] = tok, str(root / f"blend_{name}.json")
    ckpt = str(root / "ckpt_a")
    proc = run(*COMMON, "--blend-file", out["blend_a"], "--train-iters", "2", "--save", ckpt, "--save-interval", "2",
               "--data-cache-path", str(root / "cache"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out["ckpt"] = ckpt
    return out


@pytest.mark.slow
def test_checkpoint_describes_itself(world):
    from megatron_ualm.data.tokenizer import TextTokenizer
    from megatron_ualm.checkpoint_format import config_from_checkpoint, read_description
    from megatron_ualm.vocab import layout_fingerprint

    record = read_description(world["ckpt"])
    assert record["flavor"] == "debug" and record["trained_by"] == "megatron_ualm.pretrain"
    assert record["vocab"]["tokenizer"]["sha256"] == TextTokenizer(world["tok_a"]).sha256
    assert record["vocab"]["text_vocab_size"] == 224 and record["vocab"]["num_codebooks"] == 8
    assert record["vocab_fingerprint"] == layout_fingerprint(record["vocab"])
    config = config_from_checkpoint(world["ckpt"])
    assert (config.hidden_size, config.num_layers, config.vocab_size) == (64, 4, 256)


@pytest.mark.slow
def test_resume_on_data_of_another_tokenizer_is_refused(world):
    proc = run(*COMMON, "--blend-file", world["blend_b"], "--train-iters", "4", "--save", world["ckpt"], "--save-interval", "2",
               "--load", world["ckpt"])
    one_line_error(proc, "token-id layout mismatch", "checkpoint", world["blend_b"], "tokenizer sha256")


@pytest.mark.slow
def test_generate_reads_the_model_from_the_checkpoint(world, tmp_path):
    common = ["--load", world["ckpt"], "--mode", "respond", "--modality", "text", "--prompt", "the dog",
              "--max-new-tokens", "3", "--temperature", "0", "--max-audio-seconds", "0.2"]
    proc = run(*common, "--tokenizer", world["tok_a"], "--out", str(tmp_path / "ok"), module="megatron_ualm.generate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "ok" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["texts"]
    proc = run(*common, "--tokenizer", world["tok_b"], "--out", str(tmp_path / "b"), module="megatron_ualm.generate")
    one_line_error(proc, "token-id layout mismatch", world["tok_b"])


@pytest.mark.slow  # the module's pretraining run
def test_load_model_checks_flavor_and_tokenizer(world, parallel_world_of_one):
    from megatron_ualm.data.tokenizer import TextTokenizer
    from megatron_ualm.errors import CheckpointError
    from megatron_ualm.inference.checkpoint import load_model
    from megatron_ualm.vocab import VocabMismatch

    model = load_model(world["ckpt"], flavor="debug", tokenizer=TextTokenizer(world["tok_a"]))
    assert not model.training and model.config.text_vocab_size == 224
    with pytest.raises(CheckpointError, match="--flavor qwen2.5-0.5b does not match.*hidden_size"):
        load_model(world["ckpt"], flavor="qwen2.5-0.5b")
    with pytest.raises(VocabMismatch, match="tokenizer sha256"):
        load_model(world["ckpt"], tokenizer=TextTokenizer(world["tok_b"]))


@pytest.mark.slow  # the module's pretraining run
def test_export_checks_the_tokenizer_it_copies(world, tmp_path, parallel_world_of_one):
    from megatron_ualm.conversion import export_hf
    from megatron_ualm.vocab import VocabMismatch

    with pytest.raises(VocabMismatch, match="token-id layout mismatch"):
        export_hf(world["ckpt"], str(tmp_path / "hf"), tokenizer=world["tok_b"], progress=False)
    assert not os.path.exists(tmp_path / "hf")


def _lock_by_this_process(directory):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, LOCK_NAME), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": "now"}, f)
    return directory


@pytest.mark.slow
def test_common_user_errors_end_in_one_line(world, tmp_path):
    missing_iter = str(tmp_path / "missing_iter")
    shutil.copytree(world["ckpt"], missing_iter)
    with open(os.path.join(missing_iter, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("9")
    cases = {
        "no blend file": ((*COMMON, "--blend-file", str(tmp_path / "nope.json"), "--train-iters", "1"),
                          ["nope.json"]),
        "wrong encoder path": ((*COMMON, "--synthetic-data", "--train-iters", "1", "--audio-encoder-path",
                                str(tmp_path / "no_encoder")), ["audio_encoder_path", "no_encoder"]),
        "save of another run": ((*COMMON, "--synthetic-data", "--train-iters", "1", "--save", world["ckpt"],
                                 "--save-interval", "1"), ["already holds checkpoints", f"--load {world['ckpt']}"]),
        "missing iteration": ((*COMMON, "--synthetic-data", "--train-iters", "4", "--load", missing_iter, "--save",
                               missing_iter, "--save-interval", "2"), ["iter_0000009", "--ckpt-step 2"]),
        "save in use": ((*COMMON, "--synthetic-data", "--train-iters", "1", "--save-interval", "1", "--save",
                         _lock_by_this_process(str(tmp_path / "locked"))),
                        ["in use by another run", f"pid {os.getpid()}", socket.gethostname()]),
        "megatron assert in words": ((*COMMON, "--synthetic-data", "--train-iters", "1", "--save", str(tmp_path / "x")),
                                     ["--save needs --save-interval N", "Megatron's check at"]),
        "megatron assert as it is": ((*COMMON, "--synthetic-data", "--train-iters", "1", "--lr-warmup-fraction", "0.1",
                                      "--lr-warmup-iters", "1"),
                                     ["Megatron rejected the arguments", "lr-warmup-fraction and lr-warmup-iters"]),
    }
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cases, pool.map(lambda argv: run(*argv), [c[0] for c in cases.values()])))
    for name, (_, needles) in cases.items():
        one_line_error(procs[name], *needles)
    assert os.path.isfile(os.path.join(tmp_path / "locked", LOCK_NAME))  # the owner's lock is left alone


# The lock itself, in process.

def test_run_lock_refuses_a_live_owner_and_releases(tmp_path):
    lock = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
        RunLock(str(tmp_path)).acquire()
    lock.release()
    assert not os.path.exists(tmp_path / LOCK_NAME)
    RunLock(str(tmp_path)).acquire().release()


def _write_owner(directory, **owner):
    with open(os.path.join(directory, LOCK_NAME), "w") as f:
        json.dump({"host": socket.gethostname(), "started": "then", **owner}, f)


def test_run_lock_takes_over_from_dead_owners(tmp_path, capsys, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_owner(tmp_path, pid=dead.pid)
    RunLock(str(tmp_path)).acquire().release()
    assert "its process is gone" in capsys.readouterr().err

    _write_owner(tmp_path, pid=os.getpid(), pid_start="1")  # the pid now belongs to another process
    RunLock(str(tmp_path)).acquire().release()

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_owner(tmp_path, pid=1, slurm_job_id="4242")  # a requeued job finds its own lock
    RunLock(str(tmp_path)).acquire().release()
    assert "restarted" in capsys.readouterr().err


def test_run_lock_on_another_host_goes_stale_by_heartbeat(tmp_path):
    _write_owner(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(RunLockError, match="host elsewhere pid 1"):
        RunLock(str(tmp_path), stale_after_s=60).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    RunLock(str(tmp_path), stale_after_s=60).acquire().release()


@pytest.mark.slow  # the module's pretraining run
def test_export_takes_a_tokenizer_file_and_is_written_whole(world, tmp_path, parallel_world_of_one, monkeypatch):
    """``--tokenizer path/to/tokenizer.json`` is accepted like a folder, checked before anything is
    written, and an export that fails midway leaves nothing (a rerun is not refused)."""
    from megatron_ualm.conversion import ConversionError, export_hf, exporter

    tokenizer_file = os.path.join(world["tok_a"], "tokenizer.json")
    with pytest.raises(ConversionError, match="does not exist"):
        export_hf(world["ckpt"], str(tmp_path / "hf"), tokenizer=str(tmp_path / "no" / "tokenizer.json"), progress=False)
    assert os.listdir(tmp_path) == []

    def fail_after_the_weights(*args, **kwargs):
        raise RuntimeError("killed after the weights")

    monkeypatch.setattr(exporter, "save_file", fail_after_the_weights)
    with pytest.raises(RuntimeError, match="killed after the weights"):
        export_hf(world["ckpt"], str(tmp_path / "hf"), tokenizer=tokenizer_file, progress=False)
    assert os.listdir(tmp_path) == []  # neither the output nor its hidden partial folder
    monkeypatch.undo()
    out = export_hf(world["ckpt"], str(tmp_path / "hf"), tokenizer=tokenizer_file, progress=False)
    assert "tokenizer.json" in os.listdir(out) and "config.json" in os.listdir(out)
