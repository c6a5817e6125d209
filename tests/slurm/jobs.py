"""What the Slurm tests share about training jobs: submitting the repository's sbatch files with
CPU overrides, reading what the runs wrote, and waiting for them.

The overrides are the ones a user of another cluster gives on the command line (no GPUs, one
CPU per task, a short time limit, the debug config); the sbatch files are used as they are.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from localslurm import FINAL_STATES, SlurmCluster, job_output

from megatron_ualm.launch import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = "examples/slurm/pretrain.sbatch"
POSTTRAIN = "examples/slurm/posttrain.sbatch"
# The pretraining runs: 30 iterations of 4 samples, a checkpoint every 5.
ITERS, SAVE_EVERY = 30, 5
CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=20", "--open-mode=append"]
# Two launcher "nodes" (srun tasks) of one gloo rank each: on one Slurm node, or one per node.
ONE_NODE = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2"]
TWO_NODES = ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]


def submit(cluster: SlurmCluster, script: str, out: str, *args: str, layout: Sequence[str] = ONE_NODE,
           options: Sequence[str] = (), **env: str) -> str:
    """Submits ``script`` from the repository root with the CPU overrides; returns the job id.

    A free rendezvous port replaces the script's job-id default: other clusters, with their own
    job ids, may run on this machine. ``env`` adds environment variables (CONFIG, PP, ...).
    """
    job_env = cluster.job_env(NPROC_PER_NODE="1", MASTER_PORT=str(free_port()), **env)
    return cluster.sbatch(script, *args, options=[*layout, *CPU, *options, f"--output={out}"], env=job_env, cwd=REPO)


def submit_pretrain(cluster: SlurmCluster, save: str, out: str, *args: str, layout: Sequence[str] = ONE_NODE,
                    options: Sequence[str] = (), **env: str) -> str:
    """pretrain.sbatch with examples/configs/debug_cpu.sh for ITERS iterations into ``save``."""
    return submit(cluster, PRETRAIN, out, "--train-iters", str(ITERS), "--save-interval", str(SAVE_EVERY), *args,
                  layout=layout, options=options, CONFIG="examples/configs/debug_cpu.sh", CKPT_DIR=save, **env)


def metrics(save: str) -> list[dict]:
    """Every row of <save>/metrics.jsonl, in the order written (a restarted run appends)."""
    try:
        with open(os.path.join(save, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def losses(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.endswith("loss")}


def latest(save: str) -> int:
    """The iteration of the last complete checkpoint in ``save`` (0 if none)."""
    try:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return 0


def assert_completed(cluster: SlurmCluster, job: str, out: str, timeout: float = 400) -> dict:
    (record,) = cluster.wait(job, timeout=timeout)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"job {job}: {record['JobState']} exit {record['ExitCode']}\n{job_output(out)}"
    return record


def wait_for(condition, what: str, cluster: SlurmCluster, job: str, out: str, timeout: float = 300,
             period: float = 0.1, final_ok: Sequence[str] = ()):
    """Polls ``condition()`` until it returns something true (returned); fails if the job ends
    first (a final state not in ``final_ok``) or after ``timeout`` seconds, with its output."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        state = cluster.jobs(job)[0]["JobState"]
        assert state not in set(FINAL_STATES) - set(final_ok), f"job {job} is {state}, waiting for {what}\n" \
                                                               f"{job_output(out)}"
        assert time.monotonic() < deadline, f"job {job}: no {what} after {timeout:.0f} s\n{job_output(out)}"
        time.sleep(period)


class Reference:
    """A pretraining run submitted now and read when needed: ``rows()`` waits for it and returns
    its metrics by iteration (the runs that must equal it are compared row by row)."""

    def __init__(self, cluster: SlurmCluster, save: str, out: str, layout: Sequence[str] = ONE_NODE, **env: str):
        self.cluster, self.save, self.out = cluster, save, out
        self.job = submit_pretrain(cluster, save, out, layout=layout, **env)
        self._rows: Optional[dict] = None

    def rows(self) -> dict:
        if self._rows is None:
            assert_completed(self.cluster, self.job, self.out)
            self._rows = {row["iteration"]: row for row in metrics(self.save)}
            assert sorted(self._rows) == list(range(1, ITERS + 1)), f"reference {self.save}: {sorted(self._rows)}"
            assert latest(self.save) == ITERS
        return self._rows
