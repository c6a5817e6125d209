"""The repository's sbatch files across Slurm nodes (``slurm_nodes``: network namespaces on a
bridge, one slurmd each; partition ``main`` = node1 + node2, ``nodeloss`` = node3 + node4),
CPU only, gloo, the debug flavor. What each test proves:

- DP=2 across two nodes gives the losses of DP=2 on one node (``dp2_reference``), and survives
  the loss of a node: node4 is killed (its slurmd and every process on it) after a checkpoint,
  Slurm requeues the job (bounded by ``SlurmdTimeout``, tests/slurm/multinode.py), and when the
  node is back the job resumes from that checkpoint; every loss of both incarnations equals the
  reference's. Most of this scenario is waiting for Slurm, so it runs in the background on its
  own partition from the start of this module, and its test, the last one, checks it.
- PP=2 across the nodes with fault tolerance on (``FAULT_TOLERANCE=1``: ft_launcher and
  Megatron's --enable-ft-package) gives the losses of PP=2 on one node, through two hangs: a
  SIGSTOPped rank on node2, then a SIGSTOPped data-loader worker on node1. Each is detected by
  the rank monitor (a section timeout), the launchers restart every rank in the job, and the
  ranks resume from the last checkpoint.
- Without fault tolerance, a hang ends the job through the collective timeout: a SIGSTOPped rank
  (node1) or data-loader worker (node2) makes the peer's collective time out; that rank exits,
  and the launchers and srun tear the job down, on both nodes.
- SFT and DPO (posttrain.sbatch) at DP=2 across the nodes, from the pretrained checkpoint.
- The preprocessing array with one task on each node writes the shards of a one-task run.

Measured times (hang detection, restart, requeue) are recorded as test properties and printed
in the summary line of the Slurm tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from jobs import (ITERS, POSTTRAIN, REPO, SAVE_EVERY, TWO_NODES, Reference, assert_completed, latest,
                  losses, metrics, submit, submit_pretrain, wait_for)
from localslurm import job_output
from multinode import environment_of, hang_up_orphan, is_alive, parent_of, process_state

from megatron_ualm.training.loop import ARGUMENTS_FILE

# Fault-tolerance timeouts for the tests: short, yet far above a CPU step of the debug flavor
# (well under a second, a few seconds on a busy machine) and a save of it (a second or two).
# Setup covers start-up and the load. A rank stopped inside a save is killed only after the
# checkpointing timeout: every timeout a stop can land in (step, checkpointing, out of section)
# stays well under the one-minute target (with checkpointing:120, one such stop took 116 s).
FT_ENV = dict(FAULT_TOLERANCE="1", FT_SECTION_TIMEOUTS="setup:600,step:10,checkpointing:30",
              FT_OUT_OF_SECTION_TIMEOUT="30", MAX_RESTARTS="3")
TARGET_RESTART_S = 60  # issue 21: a hang detected and the job restarted within a minute
TARGET_REQUEUE_S = 45  # issue 21: a lost node ends in a requeue within 45 s
MAIN = ["node1", "node2"]  # the default partition


def loaded_iterations(out: str) -> list[int]:
    """The iteration of each checkpoint a run of this job loaded, in order."""
    return [int(i) for i in re.findall(r"successfully loaded checkpoint from \S+ .* at iteration (\d+)",
                                       job_output(out, limit=10**8))]


def assert_rows_equal(rows: list[dict], reference: dict, iterations=range(1, ITERS + 1)) -> None:
    """Every iteration was logged, and every row (a restarted run logs some twice) has the
    reference's losses at its iteration."""
    assert {row["iteration"] for row in rows} == set(iterations), sorted({row["iteration"] for row in rows})
    for row in rows:
        assert losses(row) == losses(reference[row["iteration"]]), f"iteration {row['iteration']}"


def stop(pid: int) -> float:
    os.kill(pid, signal.SIGSTOP)
    return time.monotonic()


class NodeLoss(threading.Thread):
    """The node-loss scenario on partition ``nodeloss``, run in the background (``run``); the
    last test of this module joins it (``outcome``) and checks what it recorded."""

    NODES = ["node3", "node4"]

    def __init__(self, nodes, directory):
        super().__init__(name="node-loss", daemon=True)
        self.nodes, self.save, self.out = nodes, str(directory / "ckpt"), str(directory / "job.out")
        self.times, self.job, self.record, self.error = {}, None, None, None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # re-raised by outcome(), in the test
            self.error = err

    def _run(self) -> None:
        nodes, save, out = self.nodes, self.save, self.out
        self.job = job = submit_pretrain(nodes, save, out, layout=TWO_NODES, options=["--partition=nodeloss"])
        wait_for(lambda: latest(save) >= SAVE_EVERY, "first checkpoint", nodes, job, out, timeout=600)
        killed = nodes.kill_node("node4")
        wait_for(lambda: nodes.jobs(job)[0].get("Restarts") == "1", "requeue after node4 was killed", nodes, job,
                 out, timeout=120, period=0.2, final_ok=("NODE_FAIL",))
        self.times["requeue"] = time.monotonic() - killed
        nodes.wait(job, timeout=60, states=("PENDING",))  # after a moment in COMPLETING on node3
        nodes.start_node("node4")
        # A requeued job is eligible cred_expire + 1 s after the requeue (91 s here, 121 s by
        # Slurm's default), when the old incarnation's signals to the lost node have surely been
        # delivered; start it as soon as they have (wait_delivered).
        nodes.wait_delivered()
        nodes.run("scontrol", "update", f"jobid={job}", "StartTime=now")
        self.record = assert_completed(nodes, job, out, timeout=600)
        self.times["finished"] = time.monotonic() - killed

    def outcome(self) -> "NodeLoss":
        self.join(timeout=1200)
        assert not self.is_alive(), f"the node-loss scenario did not finish\n{job_output(self.out)}"
        if self.error is not None:
            raise self.error
        return self


@pytest.fixture(scope="module", autouse=True)
def background(slurm, slurm_nodes, dp2_reference, tmp_path_factory):
    """At the start of the module: the node-loss scenario starts on its partition, and the
    one-node references run on ``slurm`` (``dp2_reference`` from conftest.py, ``pp2_reference``)."""
    scenario = NodeLoss(slurm_nodes, tmp_path_factory.mktemp("node_loss"))
    scenario.start()
    d = tmp_path_factory.mktemp("pp2_reference")
    yield dict(node_loss=scenario, pp2=Reference(slurm, str(d / "ckpt"), str(d / "job.out"), PP="2"))
    scenario.join(timeout=60)  # a failed module: the cluster's stop() cancels the job


@pytest.fixture(scope="module")
def pp2_reference(background):
    """pretrain.sbatch on one node of ``slurm`` with PP=2 (two srun tasks, one stage each)."""
    return background["pp2"]


def _restart(nodes, job: str, out: str, save: str, victim: int, what: str, record_property) -> None:
    """SIGSTOPs ``victim`` (a rank, or a data-loader worker of one), waits until fault tolerance
    has killed that rank and started new ranks on both nodes, then until they train again;
    records the times. A stopped worker outlives its killed rank (only SIGKILL or SIGCONT end a
    stopped process): ``hang_up_orphan`` does what Linux would."""
    before = {n: set(nodes.ranks(n, job)) for n in MAIN}
    rank = victim if any(victim in b for b in before.values()) else parent_of(victim)
    stopped = stop(victim)
    wait_for(lambda: not is_alive(rank), f"{what}: the hung rank killed", nodes, job, out, timeout=120)
    detected = time.monotonic() - stopped
    if victim != rank:
        assert hang_up_orphan(victim), f"{what}: the stopped worker {victim} is not an orphan"
    wait_for(lambda: all(set(nodes.ranks(n, job)) - before[n] for n in MAIN),
             f"{what}: new ranks on both nodes", nodes, job, out, timeout=120)
    restarted = time.monotonic() - stopped
    rows = len(metrics(save))  # the new ranks log nothing before their checkpoint load
    wait_for(lambda: len(metrics(save)) > rows, f"{what}: an iteration of the restarted ranks", nodes, job, out)
    training = time.monotonic() - stopped
    for name, value in (("detected", detected), ("ranks restarted", restarted), ("training again", training)):
        record_property(f"slurm_timing:{what}: {name} (s)", round(value, 1))
    assert restarted < TARGET_RESTART_S, f"{what}: ranks restarted {restarted:.0f} s after the hang"


def test_pp2_across_nodes_with_fault_tolerance_restarts_hung_ranks(slurm_nodes, pp2_reference, tmp_path,
                                                                    record_property):
    nodes = slurm_nodes
    save, out = str(tmp_path / "ckpt"), str(tmp_path / "job.out")
    job = submit_pretrain(nodes, save, out, layout=TWO_NODES, PP="2", **FT_ENV)

    wait_for(lambda: latest(save) >= SAVE_EVERY, "first checkpoint", nodes, job, out)
    (rank,) = nodes.ranks("node2", job)
    tmpdir = environment_of(rank)["TMPDIR"]  # the task's own, under the cluster's TMPDIR
    assert re.fullmatch(rf"{re.escape(nodes.root)}/tmp/ualm-{job}-1-\w{{6}}", tmpdir), tmpdir
    assert any(n.startswith("torchelastic_") for n in os.listdir(tmpdir))
    _restart(nodes, job, out, save, rank, "FT, stopped rank", record_property)
    (resumed_at,) = wait_for(lambda: loaded_iterations(out), "the restarted ranks' checkpoint load", nodes, job, out)
    assert resumed_at >= SAVE_EVERY

    wait_for(lambda: latest(save) > resumed_at, "a checkpoint of the restarted run", nodes, job, out)
    worker = wait_for(lambda: nodes.loader_workers("node1", job), "data-loader workers on node1", nodes, job, out)[0]
    _restart(nodes, job, out, save, worker, "FT, stopped data-loader worker", record_property)

    assert_completed(nodes, job, out)
    assert not [n for n in os.listdir(os.path.join(nodes.root, "tmp")) if n.startswith(f"ualm-{job}-")], \
        "the tasks' temporary directories were left behind"
    log = job_output(out, limit=10**8)
    assert "fault tolerance on" in log and "FT: initialized" in log
    assert len(re.findall(r"Section '(step|setup|checkpointing)' has been open|out-of-section", log)) >= 2, \
        "the rank monitors did not report the hangs"
    loaded = loaded_iterations(out)
    record_property("slurm_timing:FT restarts resumed from iterations", loaded)
    assert len(loaded) == 2 and loaded[1] > loaded[0]
    assert_rows_equal(metrics(save), pp2_reference.rows())


def test_without_fault_tolerance_a_collective_timeout_ends_the_job(slurm_nodes, tmp_path, record_property):
    """Two jobs side by side (--exclusive=user lets them share the nodes): in one a rank on node1
    stops, in the other a data-loader worker of the rank on node2. The peer's collective times
    out after DIST_TIMEOUT_AFTER_INIT seconds, that rank exits, its launcher stops, and srun ends
    the other node's task: the job fails, and nothing of it is left running."""
    nodes = slurm_nodes
    cases = {"stopped rank": "node1", "stopped data-loader worker": "node2"}
    jobs = {}
    for what in cases:
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        jobs[what] = (str(d / "job.out"), str(d / "ckpt"))
        # No checkpoints: a save is a collective wait of its own, longer than 10 s on a busy machine.
        jobs[what] += (submit_pretrain(nodes, jobs[what][1], jobs[what][0], "--train-iters", "100000",
                                       "--save-interval", "100000",
                                       layout=TWO_NODES, options=["--exclusive=user", "--no-requeue"],
                                       DIST_TIMEOUT_AFTER_INIT="10"),)
    stopped = {}
    for what, node in cases.items():
        out, save, job = jobs[what]
        # After the first iteration: from then on the collectives' timeout is 10 s.
        wait_for(lambda: any(row["iteration"] >= 3 for row in metrics(save)), "iteration 3", nodes, job, out)
        pid = (nodes.ranks if what == "stopped rank" else nodes.loader_workers)(node, job)[0]
        stopped[what] = (pid, stop(pid))

    torn_down, deadline = {}, time.monotonic() + 180
    while len(torn_down) < len(stopped):  # the two jobs end concurrently
        for what, (pid, t) in stopped.items():
            job = jobs[what][2]
            if what not in torn_down and not any(nodes.ranks(n, job) + nodes.launchers(n, job) for n in nodes.nodes):
                torn_down[what] = time.monotonic() - t
                hang_up_orphan(pid)  # the stopped worker, orphaned when its rank ended
        assert time.monotonic() < deadline, f"not torn down after 180 s: {set(stopped) - set(torn_down)}"
        time.sleep(0.2)
    for what, (pid, t) in stopped.items():
        out, save, job = jobs[what]
        (record,) = nodes.wait(job, timeout=120)
        ended = time.monotonic() - t
        record_property(f"slurm_timing:no FT, {what}: ranks and launchers gone (s)", round(torn_down[what], 1))
        record_property(f"slurm_timing:no FT, {what}: job ended (s)", round(ended, 1))
        assert record["JobState"] == "FAILED", f"{what}: {record['JobState']}\n{job_output(out)}"
        log = job_output(out, limit=10**8)
        assert re.search(r"Timed out waiting 10000ms for (recv|send)", log) and "exiting after RuntimeError" in log, \
            log[-5000:]
        assert torn_down[what] < TARGET_RESTART_S, \
            f"{what}: the job was torn down {torn_down[what]:.0f} s after the hang"
        for node in nodes.nodes:
            left = [(p, process_state(p)) for p in nodes.job_processes(node, job)]
            assert not left, f"{what}: processes of job {job} still on {node}: {left}"


SFT_RECORDS, PAIR_RECORDS = 24, 24


@pytest.fixture(scope="module")
def post_training_data(tmp_path_factory, tokenizer_path, audio_dir):
    """Chat shards (SFT) and preference shards (DPO) of tiny records with codes, and their blends."""
    from megatron_ualm.data.cli import build_blend_main
    from megatron_ualm.data.cli import preprocess_chat_main, preprocess_preferences_main

    rng = np.random.default_rng(0)
    words = "dog bark rain wind engine car bird song piano guitar speech crowd water".split()

    def text(n):
        return " ".join(rng.choice(words, size=n))

    def codes(frames):
        return rng.integers(0, 64, (8, frames)).tolist()

    chats = [{"messages": [{"role": "user", "content": text(4)},
                           ({"role": "assistant", "content": text(8)} if i % 2 else
                            {"role": "assistant", "codes": codes(10)})]} for i in range(SFT_RECORDS)]
    pairs = [{"prompt": text(5), "chosen": {"codes": codes(12)}, "rejected": {"codes": codes(9)}} if i % 2 else
             {"prompt": text(4), "chosen": text(6), "rejected": text(3)} for i in range(PAIR_RECORDS)]
    out = {}
    for name, tool, records in (("sft", preprocess_chat_main, chats), ("dpo", preprocess_preferences_main, pairs)):
        d = tmp_path_factory.mktemp(name)
        manifest = d / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert tool(["--input", str(manifest), "--output", str(d / "shards"), "--tokenizer", tokenizer_path,
                     "--codec", "precomputed", "--num-codebooks", "8", "--codebook-size", "64", "--frame-rate", "50",
                     "--flavor", "debug", "--audio-root", audio_dir, "--records-per-shard", "8",
                     "--no-progress"]) == 0
        assert build_blend_main([str(d / "shards"), "--output", str(d / "blend.json")]) == 0
        out[name] = str(d / "blend.json")
    return out


def test_sft_and_dpo_across_nodes(slurm_nodes, dp2_reference, post_training_data, tmp_path):
    """posttrain.sbatch at DP=2 across the nodes, SFT and DPO side by side (--exclusive=user),
    both from the pretrained checkpoint. Both ranks, one per node, read their share (the samples
    of each iteration summed over them are the global batch); DPO starts at ln 2 (the policy is
    its reference) and its reference pass, split over the two nodes, scores every pair."""
    nodes = slurm_nodes
    dp2_reference.rows()  # its final checkpoint is the base
    env = dict(CONFIG="examples/post_training/configs/debug_cpu.sh", SEQ_LENGTH="96", SFT_ITERS="4", DPO_ITERS="4",
               BASE_CKPT=dp2_reference.save)
    jobs = {}
    for stage in ("sft", "dpo"):
        out, run = str(tmp_path / f"{stage}.out"), str(tmp_path / stage)
        jobs[stage] = (submit(nodes, POSTTRAIN, out, layout=TWO_NODES, options=["--exclusive=user"], STAGE=stage,
                              OUT=run, BLEND_FILE=post_training_data[stage], **env), out, run)
    runs = {}
    for stage, (job, out, run) in jobs.items():
        record = assert_completed(nodes, job, out)
        assert record["NodeList"] == "node[1-2]"
        assert [nodes.steps_launched(n, job) for n in MAIN] == [1, 1]
        runs[stage] = {row["iteration"]: row for row in metrics(run)}
        assert sorted(runs[stage]) == [1, 2, 3, 4], f"{stage}: {sorted(runs[stage])}\n{job_output(out)}"
        assert f"ualm-posttrain: {stage} from {dp2_reference.save}" in job_output(out, limit=10**8)
    for row in runs["sft"].values():
        assert row["samples_chat"] == 4 and math.isfinite(row["lm loss"])
    assert runs["dpo"][1]["dpo loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["dpo"][1]["reward margin"] == pytest.approx(0, abs=1e-6)
    assert all(row["samples_preference"] == 4 for row in runs["dpo"].values())
    logps_dir = os.path.join(jobs["dpo"][2], "reference_logps")
    logps = [np.load(os.path.join(logps_dir, n)) for n in sorted(os.listdir(logps_dir)) if n.endswith(".npy")]
    assert logps and all(np.isfinite(a).all() for a in logps), "the reference pass left pairs unscored"


def test_preprocessing_array_with_a_task_on_each_node_equals_one_task(slurm_nodes, tmp_path, tokenizer_path,
                                                                     audio_dir):
    """preprocess_all.sh: a 2-task text array whose tasks run on different nodes (--exclusive),
    then the blend job; the shards are byte for byte a one-task run's."""
    from test_preprocess_sbatch import assert_same_shards, blend_json
    from ualm_data_test_fixtures import text_records, write_jsonl

    from megatron_ualm.data import cli

    nodes = slurm_nodes
    manifest = write_jsonl(tmp_path / "text.jsonl", text_records(40))
    out = str(tmp_path / "two_nodes")
    env = nodes.job_env(OUT=out, TASKS="2", SBATCH="--exclusive --cpus-per-task=1 --time=15", TOKENIZER=tokenizer_path,
                        TEXT=str(manifest), TEXT_ARGS="--records-per-shard 10")
    proc = subprocess.run(["bash", "examples/slurm/preprocess_all.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = dict(re.findall(r"^(\w+): job (\d+)", proc.stdout, re.M))

    one = tmp_path / "one_task"
    assert cli.preprocess_text_main(["--input", str(manifest), "--tokenizer", tokenizer_path, "--records-per-shard",
                                     "10", "--output", str(one / "text"), "--num-tasks", "1", "--task-index", "0",
                                     "--no-progress"]) == 0
    assert cli.build_blend_main([str(one / "text"), "--output", str(one / "blend.json")]) == 0

    tasks = nodes.wait(jobs["text"], timeout=300)
    assert sorted((r["ArrayTaskId"], r["JobState"]) for r in tasks) == [("0", "COMPLETED"), ("1", "COMPLETED")]
    assert {r["BatchHost"] for r in tasks} == set(MAIN), "the two tasks ran on one node"
    (blend,) = nodes.wait(jobs["blend"], timeout=300)
    assert blend["JobState"] == "COMPLETED"
    assert_same_shards(os.path.join(out, "text"), str(one / "text"))
    assert blend_json(os.path.join(out, "blend.json"), out) == blend_json(str(one / "blend.json"), str(one))


def test_dp2_across_nodes_equals_one_node_and_survives_the_loss_of_a_node(slurm_nodes, background, dp2_reference,
                                                                            record_property):
    """Checks the node-loss scenario that ran in the background (``NodeLoss``)."""
    nodes = slurm_nodes
    scenario = background["node_loss"].outcome()
    job, out = scenario.job, scenario.out
    record_property("slurm_timing:node loss -> requeue (s)", round(scenario.times["requeue"], 1))
    record_property("slurm_timing:node loss -> requeued job finished (s)", round(scenario.times["finished"], 1))
    assert scenario.times["requeue"] < TARGET_REQUEUE_S, \
        f"requeued {scenario.times['requeue']:.0f} s after the node was lost"
    assert scenario.record["Restarts"] == "1" and scenario.record["NodeList"] == "node[3-4]"
    assert [nodes.steps_launched(n, job) for n in NodeLoss.NODES] == [2, 2], \
        "each incarnation ran one task on each node"

    log = job_output(out, limit=10**8)
    assert "(restart 0), 2 task(s) x 1 rank(s), rendezvous node3:" in log and "(restart 1)" in log
    # launch.sh's timeouts reached Megatron (its argument dump, kept beside the checkpoints)
    with open(os.path.join(scenario.save, ARGUMENTS_FILE)) as f:
        arguments = f.read()
    assert re.search(r"distributed_timeout_minutes \.+ 15\n", arguments), "--distributed-timeout-minutes 15"
    assert re.search(r"distributed_timeout_seconds_after_init \.+ 300\n", arguments)
    assert re.search(r"Connection (reset|closed) by peer", log)  # node3's rank lost its peer ...
    assert "[rank0] exiting after RuntimeError" in log  # ... and exited
    loaded = loaded_iterations(out)
    record_property("slurm_timing:requeued job resumed from iteration", loaded)
    assert len(loaded) == 1 and SAVE_EVERY <= loaded[0] < ITERS
    assert_rows_equal(metrics(scenario.save), dp2_reference.rows())
    assert latest(scenario.save) == ITERS
