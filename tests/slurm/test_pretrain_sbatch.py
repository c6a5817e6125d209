"""examples/slurm/pretrain.sbatch on a real Slurm: two srun tasks, each a torchrun "node" of one
CPU rank (gloo), the debug flavor on synthetic data (examples/configs/debug_cpu.sh).

One job runs uninterrupted. A second, identical job is requeued (``scontrol requeue``: Slurm
kills it, as on a node failure or a preemption) right after its first checkpoint; Slurm starts
the same batch script again, which resumes from that checkpoint. Every loss it logged, before
and after the requeue, equals the uninterrupted job's at the same iteration.
"""

from __future__ import annotations

import json
import os
import re
import time

from localslurm import free_port, job_output

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = "examples/slurm/pretrain.sbatch"
ITERS, SAVE_EVERY = 30, 5
# Two tasks on one node, one CPU each, no GPUs: the script's H100 defaults overridden on the
# command line, as a user would on another cluster.
CPU_TASKS = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
             "--time=20", "--open-mode=append"]


def submit(slurm, save: str, out: str) -> str:
    # A free rendezvous port, not the script's job-id default: other clusters may run on this machine.
    env = slurm.job_env(CONFIG="examples/configs/debug_cpu.sh", NPROC_PER_NODE="1", CKPT_DIR=save,
                        MASTER_PORT=str(free_port()))
    return slurm.sbatch(SCRIPT, "--train-iters", str(ITERS), "--save-interval", str(SAVE_EVERY),
                        options=[*CPU_TASKS, f"--output={out}"], env=env, cwd=REPO)


def metrics(save: str) -> list[dict]:
    """Every row of <save>/metrics.jsonl, in the order written (a requeued job's run appends)."""
    with open(os.path.join(save, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.endswith("loss")}


def latest(save: str) -> int:
    try:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return 0


def assert_completed(slurm, job: str, out: str) -> dict:
    (record,) = slurm.wait(job, timeout=400)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"job {job}: {record['JobState']} exit {record['ExitCode']}\n{job_output(out)}"
    return record


def test_pretrain_sbatch_trains_and_a_requeued_job_resumes_with_the_same_losses(slurm, tmp_path):
    ref_save, ref_out = str(tmp_path / "reference"), str(tmp_path / "reference.out")
    req_save, req_out = str(tmp_path / "requeued"), str(tmp_path / "requeued.out")
    reference = submit(slurm, ref_save, ref_out)
    requeued = submit(slurm, req_save, req_out)  # starts when the reference ends (both need 2 CPUs)

    assert_completed(slurm, reference, ref_out)
    ref_rows = {row["iteration"]: row for row in metrics(ref_save)}
    assert sorted(ref_rows) == list(range(1, ITERS + 1))
    assert latest(ref_save) == ITERS
    log = job_output(ref_out, limit=10**7)
    assert "2 task(s) x 1 rank(s)" in log and "[UALM]" in log and "codebook_7 loss" in log

    deadline = time.monotonic() + 400
    while latest(req_save) < SAVE_EVERY:
        state = slurm.jobs(requeued)[0]["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {requeued} {state} before its first save\n{job_output(req_out)}"
        assert time.monotonic() < deadline, f"job {requeued} wrote no checkpoint in 400 s\n{job_output(req_out)}"
        time.sleep(0.05)
    slurm.run("scontrol", "requeue", requeued)
    # A requeued job becomes eligible only after a delay (about 2 min); start it now instead.
    slurm.wait(requeued, timeout=120, states=("PENDING",))
    slurm.run("scontrol", "update", f"jobid={requeued}", "StartTime=now")
    record = assert_completed(slurm, requeued, req_out)
    assert record["Restarts"] == "1"

    log = job_output(req_out, limit=10**7)
    assert "(restart 0)" in log and "(restart 1)" in log, log[-4000:]
    resumed = re.findall(r"successfully loaded checkpoint from \S+ .* at iteration (\d+)", log)
    assert resumed and SAVE_EVERY <= int(resumed[-1]) < ITERS, \
        f"the requeued job did not resume from a checkpoint before iteration {ITERS}: {resumed}\n{log[-4000:]}"
    rows = metrics(req_save)
    assert {row["iteration"] for row in rows} == set(range(1, ITERS + 1))
    for row in rows:  # both incarnations' rows
        assert losses(row) == losses(ref_rows[row["iteration"]]), f"iteration {row['iteration']}"
    assert latest(req_save) == ITERS
