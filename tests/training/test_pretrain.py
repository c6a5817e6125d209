"""The pretraining entry point on Megatron's loop, on CPU with gloo.

One uninterrupted TP=1 run is the reference. Resuming it from its iteration-3 checkpoint
reproduces iterations 4..6 exactly (same TP), or to float32 rounding at TP=2, at PP=2 and at
PP=2 with two virtual stages per rank (the checkpoint is resharded by dist_checkpointing); a run killed in the middle of writing
a checkpoint resumes from the previous one.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from ualm_testing import child_env, run_ok
from ualm_testing import torchrun as launch_cmd

from megatron_ualm.checkpoint_format import read_tracker

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out

HERE = os.path.dirname(__file__)
COMMON = [
    "--flavor", "debug", "--synthetic-data", "--train-iters", "6", "--micro-batch-size", "2",
    "--global-batch-size", "4", "--seq-length", "64", "--lr", "1e-3", "--log-interval", "1",
    "--eval-iters", "0", "--save-interval", "3", "--seed", "1234",
]


def torchrun(nproc: int, *args: str, script=None, env=None, log=None):
    """Runs the entry point; with ``log`` (a file path) returns the running process instead."""
    target = [script] if script else ["-m", "megatron_ualm.pretrain"]
    cmd = launch_cmd(nproc, *target, *args)
    full_env = child_env(**(env or {}))
    if log is not None:
        # A file, not a pipe: nobody reads the pipe while the run goes on, and a full pipe
        # would block the run before it reaches the save.
        with open(log, "w") as out:
            return subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return run_ok(cmd, env=full_env)


def losses(save_dir: str) -> dict:
    rows = {}
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows[row["iteration"]] = row
    return rows


def resume_dir(reference: str, target: str) -> str:
    """A save directory holding only the reference's iteration-3 checkpoint."""
    os.makedirs(target)
    shutil.copytree(os.path.join(reference, "iter_0000003"), os.path.join(target, "iter_0000003"))
    with open(os.path.join(target, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("3")
    return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    save = str(tmp_path_factory.mktemp("reference") / "ckpt")
    log = torchrun(1, *COMMON, "--save", save, "--tensorboard-dir", os.path.join(save, "tb"))
    assert "lm loss" in log and "codebook_7 loss" in log and "[UALM]" in log
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:  # a CPU machine: one line, once per run
        assert log.count("Transformer Engine / Apex not installed") == 1, log[:3000]
        assert "Falling back" not in log and "Transformer Engine and Apex are not installed" not in log
    if not torch.cuda.is_available():  # Megatron's memory lines give the host's numbers, not CUDA's zeros
        assert "(after 1 iterations) host memory (MB) | resident: " in log and "max allocated" not in log, log[-3000:]
    return save


def test_reference_run_logs_ualm_metrics_and_saves(reference):
    rows = losses(reference)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for row in rows.values():
        assert row["tokens_per_sec_per_gpu"] > 0 and row["ualm_tflops_per_gpu"] > 0
        assert sum(v for k, v in row.items() if k.startswith("samples_")) == 4  # global batch
        assert {f"codebook_{k} loss" for k in range(8)} <= set(row)
    with open(os.path.join(reference, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "6"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(reference, "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "codebook_7 loss", "ualm/tokens_per_sec_per_gpu", "ualm/samples_generation"} <= tags
    assert sorted(d for d in os.listdir(reference) if d.startswith("iter_")) == ["iter_0000003", "iter_0000006"]


def test_resume_same_tp_is_exact(reference, tmp_path):
    save = resume_dir(reference, str(tmp_path / "ckpt"))
    torchrun(1, *COMMON, "--save", save, "--load", save)
    ref, got = losses(reference), losses(save)
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        assert got[it]["lm loss"] == ref[it]["lm loss"]
        assert got[it]["codebook_3 loss"] == ref[it]["codebook_3 loss"]


@pytest.mark.parametrize("parallel", [
    ["--tensor-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],  # interleaved
], ids=["tp2", "pp2", "pp2-vp2"])
def test_resume_at_other_parallelism_matches(reference, tmp_path, parallel):
    save = resume_dir(reference, str(tmp_path / "ckpt"))
    torchrun(2, *COMMON, *parallel, "--save", save, "--load", save)
    ref, got = losses(reference), losses(save)
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        assert got[it]["lm loss"] == pytest.approx(ref[it]["lm loss"], rel=1e-5)


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_sigkill_during_save_resumes_from_previous_checkpoint(reference, tmp_path):
    save = str(tmp_path / "ckpt")
    marker = str(tmp_path / "saving")
    log = str(tmp_path / "killed.log")
    proc = torchrun(1, *COMMON, "--save", save, script=os.path.join(HERE, "kill_during_save.py"),
                    env={"UALM_TEST_MARKER": marker}, log=log)
    deadline = time.time() + 600
    while not os.path.exists(marker):
        assert proc.poll() is None, open(log).read()[-4000:]
        assert time.time() < deadline, "the run never reached the iteration-6 save"
        time.sleep(0.5)
    worker = int(open(marker).read())
    helpers = _children(worker)  # Megatron's checkpoint-writer manager, data workers
    assert helpers
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher
    os.kill(worker, signal.SIGKILL)  # the training process alone: its helpers must follow it
    proc.wait(timeout=60)
    deadline = time.time() + 30
    while any(_alive(p) for p in helpers) and time.time() < deadline:
        time.sleep(0.5)
    assert not [p for p in helpers if _alive(p)], "helper processes outlived the killed training process"
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "3"
    # The interrupted save is only visible as a .partial directory, never as iter_0000006.
    assert os.path.exists(os.path.join(save, "iter_0000006.partial", "half_written.distcp"))
    assert not os.path.exists(os.path.join(save, "iter_0000006"))
    resumed = torchrun(1, *COMMON, "--save", save, "--load", save)
    assert "successfully loaded checkpoint" in resumed and "at iteration 3" in resumed
    rows = losses(save)
    assert rows[6]["lm loss"] == losses(reference)[6]["lm loss"]


def _signal_a_long_run(tmp_path, sig: int, *flags: str):
    """Starts a 500-iteration run by hand (its own session, one data worker), sends ``sig`` to all
    its processes after iteration 4 (one save done, so the writer's manager process exists), and
    returns (save directory, log file, exit status)."""
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "run.log")
    cmd = [sys.executable, "-m", "megatron_ualm.pretrain", *COMMON[:COMMON.index("--train-iters")],
           "--train-iters", "500", *COMMON[COMMON.index("--train-iters") + 2:], "--save", save,
           "--num-workers", "1", *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while "iteration        4/" not in open(log).read():
        assert proc.poll() is None and time.time() < deadline, open(log).read()[-4000:]
        time.sleep(0.5)
    os.killpg(proc.pid, sig)
    try:
        return save, log, proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not exit within 120 s of the signal:\n{open(log).read()[-4000:]}")


def test_sigterm_to_the_whole_job_saves_and_exits(tmp_path):
    """What Slurm does at a requeue or a time limit: SIGTERM to every process of the step, data
    workers and Megatron's checkpoint-writer manager included. With --exit-signal-handler the run
    saves the iteration it is at and exits 0."""
    save, log, status = _signal_a_long_run(tmp_path, signal.SIGTERM, "--exit-signal-handler")
    assert status == 0, open(log).read()[-4000:]
    assert "exiting program after receiving SIGTERM" in open(log).read()
    folder = read_tracker(save)
    assert 4 <= int(folder.removeprefix("iter_")) < 500 and os.path.isdir(os.path.join(save, folder))


def test_ctrl_c_ends_the_run_in_one_line_naming_what_resumes(tmp_path):
    """SIGINT to the run's processes (Ctrl-C in a terminal): exit status 130 and one line that
    names the last checkpoint and how to resume, not a traceback from the middle of a step."""
    save, log, status = _signal_a_long_run(tmp_path, signal.SIGINT, "--load", str(tmp_path / "ckpt"))
    text = open(log).read()
    assert status == 130, text[-4000:]
    folder = read_tracker(save)
    assert os.path.isdir(os.path.join(save, folder))
    line = f"interrupted (SIGINT): the last checkpoint is {save}/{folder}; the same command resumes from it"
    assert text.count(line) == 1 and "Traceback" not in text, text[-4000:]


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    save = str(tmp_path / "ckpt")
    cmd = [sys.executable, os.path.join(HERE, "disk_full_during_save.py"), *COMMON, "--save", save]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(env, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if x.startswith("error:"))
    assert "no space left on device" in line and "iter_0000006.partial" in line and "(iteration 3) is kept" in line
    assert sorted(d for d in os.listdir(save) if d.startswith("iter_")) == ["iter_0000003"]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "3"


def test_training_checkpoint_exports_to_transformers(reference, tmp_path):
    """The loop's checkpoint converts to a Qwen2ForCausalLM with the same text logits."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    hf = str(tmp_path / "hf")
    for cmd in ([sys.executable, "-m", "megatron_ualm.conversion", "export", "--load", reference, "--flavor", "debug",
                 "--output", hf],
                [sys.executable, os.path.join(HERE, "export_parity.py"), reference, hf]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    diff = float(proc.stdout.split("MAX_ABS_DIFF")[1].split()[0])
    assert diff < 1e-4


def _true_family_counts(iteration: int) -> dict:
    """Families and encoder windows of the global batch of ``iteration`` (synthetic data: the
    sampler reads samples [4 (it - 1), 4 it) of the train dataset, seeded with --seed)."""
    from collections import Counter

    from megatron_ualm.config import make_config
    from megatron_ualm.synthetic import FAMILIES
    from megatron_ualm.synthetic import SyntheticDataset

    dataset = SyntheticDataset(make_config("debug"), 64, 100, seed=1234)
    items = [dataset[i] for i in range(4 * (iteration - 1), 4 * iteration)]
    counts = Counter(f"samples_{FAMILIES[int(it['dataset_id'])]}" for it in items)
    counts["encoder_windows"] = sum(int(it["audio_in_lengths"].numel()) for it in items)
    return counts


def test_distributed_optimizer_dp2_resume_is_exact(tmp_path):
    """Two data-parallel ranks with the distributed optimizer: resuming from iteration 3
    reproduces the uninterrupted run (optimizer state sharded over DP and restored). The
    [UALM] counts are the sum over both ranks: the true global batch."""
    full = str(tmp_path / "full")
    torchrun(2, *COMMON, "--use-distributed-optimizer", "--save", full)
    for it, row in losses(full).items():
        true = _true_family_counts(it)
        assert {k: row.get(k, 0) for k in true} == dict(true), (it, row)
    resumed = resume_dir(full, str(tmp_path / "resumed"))
    torchrun(2, *COMMON, "--use-distributed-optimizer", "--save", resumed, "--load", resumed)
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for it in (4, 5, 6):
        assert got[it]["lm loss"] == pytest.approx(ref[it]["lm loss"], rel=1e-6)
