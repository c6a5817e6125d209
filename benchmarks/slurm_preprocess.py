"""Preprocessing throughput on Slurm: the repository's preprocess_<family>.sbatch arrays with 1,
2 and 4 tasks (one worker per task), on synthetic manifests at realistic sizes.

For each family and task count: records/s is the records of the tasks' summaries over the
array's makespan (first task start to last task end, Slurm's clock, 1 s resolution; each
task's Python start and model load included, as on a cluster); per task, a task's records over
its tool's wall time; per CPU-s, the records over the CPU seconds the tools used (user + sys,
workers included), which does not depend on what else runs on the machine: one worker on an
idle core goes about that fast. (The jobs run ``$PYTHON``, here a wrapper that times the tool.) Generation encodes 10 s clips with a full-size randomly
initialised X-Codec (speed does not depend on the weights) on CPU (``--gpus=0``), or on the
task's GPU with ``--gpus 1``.

    python benchmarks/slurm_preprocess.py --local            # a one-node Slurm on this machine
    python benchmarks/slurm_preprocess.py --sbatch-args "--partition=cpu" --workdir /shared/tmp/bench

``--local`` starts munged + slurmctld + slurmd on localhost (tests/slurm/localslurm.py; needs
``scripts/setup_slurm.sh``); otherwise the jobs go to the Slurm that ``sbatch`` reaches, and
``--workdir`` must be on a file system the compute nodes share.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def load_localslurm():
    spec = importlib.util.spec_from_file_location("localslurm", os.path.join(REPO, "tests", "slurm", "localslurm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scontrol_records(job: str, env: dict) -> list[dict]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, env=env, check=True)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line.strip()]


def wait(job: str, env: dict, timeout: float) -> list[dict]:
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
    deadline = time.monotonic() + timeout
    while True:
        records = scontrol_records(job, env)
        if records and all(r["JobState"] in final for r in records):
            return records
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job} did not finish in {timeout:.0f} s")
        time.sleep(1)


def summary(path: str) -> dict:
    """The JSON summary a preprocessing tool prints last."""
    with open(path) as f:
        text = "\n" + f.read()
    start = text.rindex("\n{") + 1
    return json.loads(text[start:text.index("\n}", start) + 2])


TIMED_PYTHON = """#!/bin/bash
# The sbatch files run "${PYTHON:-python}"; this one also reports the tool's own wall and CPU time.
start=$(date +%s.%N)
"$BENCH_PYTHON" "$@"
rc=$?
echo "BENCH_WALL $start $(date +%s.%N)"
echo BENCH_CPU  # then "times" (a builtin: no subshell, whose counters would start at zero)
times
exit $rc
"""


def tool_times(path: str) -> tuple[float, float]:
    """(wall, CPU) seconds of the tool in a job's output (TIMED_PYTHON's lines)."""
    with open(path) as f:
        text = f.read()
    start, end = map(float, re.search(r"BENCH_WALL (\S+) (\S+)", text).groups())
    children = re.search(r"BENCH_CPU\n.*\n(.*)", text).group(1)  # user and sys of the tool, "1m2.345s"
    cpu = sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", children))
    return end - start, cpu


def stamp(value: str) -> float:
    return datetime.datetime.fromisoformat(value).timestamp()


def run_array(family: str, tasks: int, tool_args: list[str], out: str, sbatch_args: list[str], env: dict,
              timeout: float) -> dict:
    """Submits preprocess_<family>.sbatch as ``tasks`` array tasks; returns the measurements."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--array=0-{tasks - 1}", "--cpus-per-task=1", *sbatch_args,
           f"--output={logs}/%x-%A_%a.out", f"examples/slurm/preprocess_{family}.sbatch", "--num-tasks", str(tasks),
           "--output", os.path.join(out, family), *tool_args]
    job = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=True).stdout.strip()
    job = job.split(";")[0]
    records = wait(job, env, timeout)
    bad = [r for r in records if (r["JobState"], r["ExitCode"]) != ("COMPLETED", "0:0")]
    if bad:
        raise SystemExit(f"{family} x{tasks}: {[(r['JobId'], r['JobState'], r['ExitCode']) for r in bad]}; "
                         f"logs in {logs}")
    per_task = []
    for r in records:
        log = os.path.join(logs, f"{r['JobName']}-{job}_{r['ArrayTaskId']}.out")
        per_task.append((summary(log)["records"], *tool_times(log)))
    span = max(stamp(r["EndTime"]) for r in records) - min(stamp(r["StartTime"]) for r in records)
    total = sum(n for n, _, _ in per_task)
    return dict(family=family, tasks=tasks, records=total, seconds=span, records_per_s=total / max(span, 1.0),
                per_task=sum(n / wall for n, wall, _ in per_task) / len(per_task),
                per_cpu_s=total / sum(cpu for _, _, cpu in per_task))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local", action="store_true", help="start a one-node Slurm on this machine for the run")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ualm_slurm_bench"))
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--families", nargs="+", default=["text", "understanding", "generation"],
                        choices=["text", "understanding", "generation"])
    parser.add_argument("--text-records", type=int, default=8000)
    parser.add_argument("--understanding-records", type=int, default=2400)
    parser.add_argument("--generation-clips", type=int, default=8, help="10 s clips (about 5 s each per CPU task)")
    parser.add_argument("--sbatch-args", default="", help="more sbatch flags, e.g. '--partition=cpu --account=x'")
    parser.add_argument("--generation-sbatch-args", default="--gpus=0",
                        help="sbatch flags of the generation arrays (default --gpus=0: X-Codec on CPU; "
                             "'--gpus=1' for one GPU per task)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for one array")
    args = parser.parse_args()
    sys.path.insert(0, HERE)
    from data_corpus import generation_manifest, text_manifest, train_tokenizer, understanding_manifest, write_clips
    from preprocess_throughput import full_size_xcodec

    w = lambda *p: os.path.join(os.path.abspath(args.workdir), *p)  # noqa: E731
    os.makedirs(w(), exist_ok=True)
    tok = train_tokenizer(w("tokenizer.json"))
    clips = write_clips(w("clips"), 8)
    inputs = {
        "text": ["--input", text_manifest(w("text.jsonl"), args.text_records), "--records-per-shard",
                 str(max(args.text_records // 16, 1))],
        "understanding": ["--input", understanding_manifest(w("und.jsonl"), clips, args.understanding_records),
                          "--flavor", "qwen2.5-7b", "--records-per-shard", str(max(args.understanding_records // 16, 1))],
        "generation": ["--input", generation_manifest(w("gen.jsonl"), clips, args.generation_clips),
                       "--codec-path", full_size_xcodec(w("xcodec_full")),
                       "--records-per-shard", str(max(args.generation_clips // 4, 1))],
    }

    cluster = load_localslurm().SlurmCluster().start() if args.local else None
    try:
        env = cluster.job_env() if cluster else dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
        with open(w("timed_python"), "w") as f:
            f.write(TIMED_PYTHON)
        os.chmod(w("timed_python"), 0o755)
        env.update(PYTHON=w("timed_python"), BENCH_PYTHON=sys.executable)
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", cpu)
        print(f"{os.cpu_count()} CPUs ({model.group(1).strip() if model else '?'}); load average "
              f"{os.getloadavg()[0]:.1f}; {'local one-node Slurm' if cluster else 'the Slurm sbatch reaches'}")
        print(f"{'family':<15}{'tasks':>6}{'records':>9}{'seconds':>9}{'records/s':>11}{'speed-up':>10}"
              f"{'per task':>10}{'per CPU-s':>11}")
        for family in args.families:
            base = None
            for n in args.tasks:
                extra = shlex.split(args.sbatch_args)
                if family == "generation":
                    extra += shlex.split(args.generation_sbatch_args)
                r = run_array(family, n, ["--tokenizer", tok, *inputs[family]], w(f"{family}_x{n}_{time.time_ns()}"),
                              extra, env, args.timeout)
                base = base or r["records_per_s"]
                print(f"{family:<15}{n:>6}{r['records']:>9}{r['seconds']:>9.0f}{r['records_per_s']:>11.2f}"
                      f"{r['records_per_s'] / base:>9.2f}x{r['per_task']:>10.2f}{r['per_cpu_s']:>11.2f}", flush=True)
    finally:
        if cluster:
            cluster.stop()


if __name__ == "__main__":
    main()
