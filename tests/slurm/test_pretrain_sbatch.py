"""examples/slurm/pretrain.sbatch on a real Slurm: two srun tasks, each a torchrun "node" of one
CPU rank (gloo), the debug flavor on synthetic data (examples/configs/debug_cpu.sh).

One job runs uninterrupted (the ``dp2_reference`` of conftest.py, which the multi-node tests
compare with too). A second, identical job is requeued (``scontrol requeue``: Slurm
kills it, as on a node failure or a preemption) right after its first checkpoint; Slurm starts
the same batch script again, which resumes from that checkpoint. Every loss it logged, before
and after the requeue, equals the uninterrupted job's at the same iteration.
"""

from __future__ import annotations

import re
import time

from jobs import ITERS, SAVE_EVERY, assert_completed, latest, losses, metrics, submit_pretrain
from localslurm import job_output


def test_pretrain_sbatch_trains_and_a_requeued_job_resumes_with_the_same_losses(slurm, dp2_reference, tmp_path):
    req_save, req_out = str(tmp_path / "requeued"), str(tmp_path / "requeued.out")
    requeued = submit_pretrain(slurm, req_save, req_out)  # starts when the reference ends (both need 2 CPUs)

    ref_rows = dp2_reference.rows()
    log = job_output(dp2_reference.out, limit=10**7)
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
