"""Preprocessing on a real Slurm: examples/slurm/preprocess_all.sh submits the repository's
preprocess_{text,generation,understanding}.sbatch as 2-task arrays and build_blend.sbatch after
them (--dependency=afterok), on the tiny corpora of the data tests, CPU only.

- Every array task and the blend job exit 0; the shards are byte for byte a one-task run's,
  and the blend is the one-task run's blend up to the output directory.
- A cancelled array task leaves the set incomplete: Slurm cancels the dependent blend job,
  build_blend refuses the set naming the task, and rerunning that task alone
  (``sbatch --array=1`` through the written resubmit script) completes it.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
import time

import pytest

from localslurm import job_output

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAMILIES = ("text", "generation", "understanding")
# Several shards per family, so that both tasks of a 2-task array write some.
TOOL_ARGS = {"text": ["--records-per-shard", "10"], "generation": ["--records-per-shard", "16"],
             "understanding": ["--records-per-shard", "16"]}
CPU_JOBS = "--cpus-per-task=1 --time=15"  # the examples ask for 16 CPUs (and a GPU for generation)


@pytest.fixture(scope="module")
def manifests(tmp_path_factory, audio_dir):
    from ualm_data_test_fixtures import text_records, write_jsonl

    text = write_jsonl(tmp_path_factory.mktemp("manifests") / "text.jsonl", text_records(40))
    return {"text": text, "generation": os.path.join(audio_dir, "gen.jsonl"),
            "understanding": os.path.join(audio_dir, "und.jsonl")}


def family_args(family: str, manifests: dict, tokenizer_path: str, codec_dir: str) -> list[str]:
    """The tool arguments preprocess_all.sh passes for ``family`` (apart from --num-tasks)."""
    extra = {"generation": ["--codec-path", codec_dir], "understanding": ["--flavor", "debug"]}.get(family, [])
    return ["--input", manifests[family], "--tokenizer", tokenizer_path, *extra, *TOOL_ARGS[family]]


@pytest.fixture(scope="module")
def one_task(tmp_path_factory, manifests, tokenizer_path, codec_dir):
    """Every family preprocessed by one task in this process, and the blends of all and of text."""
    from megatron_ualm.data import cli

    out = tmp_path_factory.mktemp("one_task")
    for family in FAMILIES:
        main = getattr(cli, f"preprocess_{family}_main")
        assert main([*family_args(family, manifests, tokenizer_path, codec_dir), "--output", str(out / family),
                     "--num-tasks", "1", "--task-index", "0", "--no-progress"]) == 0
    assert cli.build_blend_main([*(str(out / f) for f in FAMILIES), "--output", str(out / "blend.json")]) == 0
    assert cli.build_blend_main([str(out / "text"), "--output", str(out / "text_blend.json")]) == 0
    return str(out)


def preprocess_all(slurm, out: str, env: dict) -> dict[str, str]:
    """Runs examples/slurm/preprocess_all.sh; returns {family or 'blend': job id}."""
    env = slurm.job_env(OUT=out, TASKS="2", SBATCH=CPU_JOBS, GENERATION_SBATCH="--gpus=0", **env)
    proc = subprocess.run(["bash", "examples/slurm/preprocess_all.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(re.findall(r"^(\w+): job (\d+)", proc.stdout, re.M))


def family_env(families, manifests, tokenizer_path, codec_dir) -> dict[str, str]:
    env = dict(TOKENIZER=tokenizer_path, CODEC_PATH=codec_dir, FLAVOR="debug")
    for family in families:
        env[family.upper()] = manifests[family]
        env[f"{family.upper()}_ARGS"] = " ".join(TOOL_ARGS[family])
    return env


def assert_all_completed(slurm, job: str, out: str, tasks: int = 0) -> None:
    """Every task of ``job`` (an array of ``tasks`` tasks, or a plain job) exited 0."""
    records = slurm.wait(job, timeout=300)
    got = sorted((r.get("ArrayTaskId", "-"), r["JobState"], r["ExitCode"]) for r in records)
    want = sorted((str(i), "COMPLETED", "0:0") for i in range(tasks)) if tasks else [("-", "COMPLETED", "0:0")]
    assert got == want, f"job {job}: {got}\n{logs(out)}"


def logs(out: str) -> str:
    d = os.path.join(out, "logs")
    return "\n".join(f"--- {name}\n{job_output(os.path.join(d, name), 3000)}"
                     for name in sorted(os.listdir(d)) if name.endswith(".out")) if os.path.isdir(d) else ""


def assert_same_shards(got: str, want: str) -> None:
    """The same shard directories, every file byte for byte."""
    names = sorted(n for n in os.listdir(want) if os.path.isdir(os.path.join(want, n)))
    assert names and sorted(n for n in os.listdir(got) if os.path.isdir(os.path.join(got, n))) == names
    for name in names:
        files = sorted(os.listdir(os.path.join(want, name)))
        assert sorted(os.listdir(os.path.join(got, name))) == files, name
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(got, name), os.path.join(want, name), files,
                                                   shallow=False)
        assert (mismatch, errors) == ([], []), f"{name}: {mismatch + errors} differ"


def blend_json(path: str, root: str) -> dict:
    with open(path) as f:
        return json.loads(f.read().replace(os.path.realpath(root), "<OUT>").replace(root, "<OUT>"))


def test_two_task_arrays_and_their_blend_equal_one_task(slurm, tmp_path, request, manifests, tokenizer_path,
                                                        codec_dir):
    out = str(tmp_path / "two_tasks")
    jobs = preprocess_all(slurm, out, family_env(FAMILIES, manifests, tokenizer_path, codec_dir))
    assert sorted(jobs) == sorted([*FAMILIES, "blend"])
    one = request.getfixturevalue("one_task")  # built in this process while the jobs run

    for family in FAMILIES:
        assert_all_completed(slurm, jobs[family], out, tasks=2)
    assert_all_completed(slurm, jobs["blend"], out)
    for family in FAMILIES:
        assert_same_shards(os.path.join(out, family), os.path.join(one, family))
        assert os.path.exists(os.path.join(out, family, f"{family}.task-00001-of-00002.json"))
    assert blend_json(os.path.join(out, "blend.json"), out) == blend_json(os.path.join(one, "blend.json"), one)


def test_a_cancelled_task_rerun_alone_completes_the_set(slurm, tmp_path, capsys, one_task, manifests,
                                                        tokenizer_path, codec_dir):
    out = str(tmp_path / "cancelled")
    # Task 1 is held in its job until cancelled: cancelling as soon as Slurm says RUNNING raced the
    # task (a loaded machine once finished its few shards before the signal landed: COMPLETED work
    # in a CANCELLED task). The hold is the sbatch's own PYTHON override, so the job is the real one.
    started, hold = tmp_path / "task1.started", tmp_path / "task1.hold"
    wrapper = tmp_path / "python_holding_task1"
    wrapper.write_text(f"""#!/bin/bash
if [ "${{SLURM_ARRAY_TASK_ID:-}}" = 1 ] && [ -e {hold} ]; then touch {started}; exec sleep 600; fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    hold.touch()
    jobs = preprocess_all(slurm, out, dict(family_env(["text"], manifests, tokenizer_path, codec_dir),
                                           PYTHON=str(wrapper)))
    text, blend = jobs["text"], jobs["blend"]

    deadline = time.monotonic() + 120
    while not started.exists():
        state = slurm.jobs(f"{text}_1")[0]["JobState"]
        assert state in ("PENDING", "RUNNING") and time.monotonic() < deadline, f"task {text}_1 is {state}"
        time.sleep(0.1)
    slurm.run("scancel", f"{text}_1")
    hold.unlink()  # the rerun below runs the tool
    states = {r["ArrayTaskId"]: r["JobState"] for r in slurm.wait(text, timeout=300)}
    assert states == {"0": "COMPLETED", "1": "CANCELLED"}, f"{states}\n{logs(out)}"
    # Its dependency can never be met: Slurm cancels the blend job instead of blending a partial set.
    (record,) = slurm.wait(blend, timeout=60)
    assert record["JobState"] == "CANCELLED" and "DependencyNeverSatisfied" in record["Reason"], record

    from megatron_ualm.data.cli import build_blend_main

    partial = str(tmp_path / "partial_blend.json")
    assert build_blend_main([os.path.join(out, "text"), "--output", partial]) != 0
    assert not os.path.exists(partial)
    assert re.search(r"task\(s\) 1 of 2 have not finished", capsys.readouterr().err)

    rerun = subprocess.run(["bash", os.path.join(out, "logs", "resubmit_text.sh"), "1"], capture_output=True,
                           text=True, env=slurm.job_env(), timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    rerun_job = rerun.stdout.strip().split(";")[0]
    (record,) = slurm.wait(rerun_job, timeout=300)
    assert (record["ArrayTaskId"], record["JobState"], record["ExitCode"]) == ("1", "COMPLETED", "0:0"), \
        f"{record}\n{logs(out)}"

    again = subprocess.run(["bash", os.path.join(out, "logs", "resubmit_blend.sh"), rerun_job], capture_output=True,
                           text=True, env=slurm.job_env(), timeout=60)
    assert again.returncode == 0, again.stderr
    assert_all_completed(slurm, again.stdout.strip().split(";")[0], out)
    assert_same_shards(os.path.join(out, "text"), os.path.join(one_task, "text"))
    assert blend_json(os.path.join(out, "blend.json"), out) == \
        blend_json(os.path.join(one_task, "text_blend.json"), one_task)
