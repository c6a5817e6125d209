"""Preprocessing split across tasks: the launcher's defaults, a union equal to one task,
a failed task rerun alone, refusals of partial or mixed splits, and a progress bar that
counts only new work."""

from __future__ import annotations

import filecmp
import glob
import json
import os
import re
import shutil

import pytest

from megatron_ualm.data import preprocess
from megatron_ualm.data.cli import build_blend_main, inspect_shards_main, preprocess_text_main
from megatron_ualm.data.preprocess import open_manifest, read_shards
from megatron_ualm.data.tasks import Task, TaskError, resolve_task

PER_SHARD = 20


def shard_dirs(out) -> list[str]:
    return sorted(glob.glob(os.path.join(str(out), "text-[0-9]*")))


def stamps(out) -> dict:
    return {os.path.basename(s): os.stat(os.path.join(s, "text.bin")).st_mtime_ns for s in shard_dirs(out)}


def assert_same_shards(a, b) -> None:
    """Every shard of ``a`` and ``b``, every file in it, byte for byte."""
    assert [os.path.basename(s) for s in shard_dirs(a)] == [os.path.basename(s) for s in shard_dirs(b)]
    for x, y in zip(shard_dirs(a), shard_dirs(b)):
        assert sorted(os.listdir(x)) == sorted(os.listdir(y))
        for f in os.listdir(x):
            assert filecmp.cmp(os.path.join(x, f), os.path.join(y, f), shallow=False), (x, f)


def write_manifests(directory, bad_parquet_row=None) -> list[str]:
    """85 records over a JSONL (blank lines, a bad record) and a Parquet file (row groups of 16):
    five shards of 20, the third spanning both files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [json.dumps({"text": f"dog bark {'rain ' * (i % 5)}{i}"}) for i in range(45)]
    lines[7] = json.dumps({"text": ""})  # rejected: empty text (record 7, shard 0)
    lines.insert(3, "")
    lines.insert(20, "   ")
    (directory / "a.jsonl").write_text("\n".join(lines) + "\n")
    rows = [{"text": f"bell siren {i}"} for i in range(40)]
    if bad_parquet_row is not None:
        rows[bad_parquet_row] = {"text": ""}
    pq.write_table(pa.Table.from_pylist(rows), directory / "b.parquet", row_group_size=16)
    return [str(directory / "a.jsonl"), str(directory / "b.parquet")]


@pytest.fixture
def manifests(tmp_path):
    return write_manifests(tmp_path)


def text_args(manifests, out, tokenizer_path, *extra) -> list[str]:
    return ["--input", *manifests, "--output", str(out), "--tokenizer", tokenizer_path, "--no-progress",
            "--records-per-shard", str(PER_SHARD), *extra]


def split(n: int, i: int) -> list[str]:
    return ["--num-tasks", str(n), "--task-index", str(i)]


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1)),
    ({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4)),
    ({"SLURM_NTASKS": "3", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}, (1, 3)),
    ({"SLURM_NTASKS": "3", "SLURM_PROCID": "0"}, (0, 1)),  # the batch script itself: one process
    ({"WORLD_SIZE": "2", "RANK": "1"}, (1, 2)),
    ({"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "1", "WORLD_SIZE": "8", "RANK": "5"}, (1, 2)),
])
def test_task_from_the_launcher_environment(env, expected):
    task = resolve_task(environ=env)
    assert (task.index, task.count) == expected
    assert (resolve_task(3, 2, environ=env).index, resolve_task(3, 2, environ=env).count) == (2, 3)  # flags win


@pytest.mark.parametrize("flags, env, message", [
    ((4, None), {}, "--task-index is needed"),
    ((2, 2), {}, "not in [0, 2)"),
    ((0, 0), {}, ">= 1"),
    ((None, None), {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1"},
     "not in [0, 3)"),
    ((None, None), {"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
])
def test_task_errors_say_what_to_pass(flags, env, message):
    with pytest.raises(TaskError, match=re.escape(message)):
        resolve_task(*flags, environ=env)


def test_counting_and_reading_agree_on_records(tmp_path, manifests):
    path = tmp_path / "edge.jsonl"
    path.write_bytes(b'\n  \n{"text": "a"}\r\n\r\n{"text": "b"}\n\t\n{"text": "\xff"}\n{"text": "c"}')  # no final newline
    for p in [str(path), *manifests]:
        m = open_manifest(p)
        got = [r for _, records in read_shards([m], 3, range(100)) for r in records]
        assert len(got) == m.records
    sources = [s for _, records in read_shards([open_manifest(str(path))], 2, [0, 1]) for s, _ in records]
    assert sources == [f"{path}:{n}" for n in (3, 5, 7, 8)]
    # Reading only some shards yields exactly their records, from both files.
    ms = [open_manifest(p) for p in manifests]
    assert [(k, len(r)) for k, r in read_shards(ms, PER_SHARD, [2, 4])] == [(2, 20), (4, 5)]
    second = dict(read_shards(ms, PER_SHARD, [2]))[2]
    assert second[4][0].endswith("a.jsonl:47") and second[5][0].endswith("b.parquet:row 0")


def test_union_of_tasks_equals_one_task(tmp_path, manifests, tokenizer_path):
    one, three = tmp_path / "one", tmp_path / "three"
    assert preprocess_text_main(text_args(manifests, one, tokenizer_path)) == 0
    os.makedirs(three / ".text-00001.partial")  # task 1's shard, half-written by a run still going
    assert preprocess_text_main(text_args(manifests, three, tokenizer_path, *split(3, 0))) == 0
    assert os.path.isdir(three / ".text-00001.partial"), "task 0 must leave other tasks' partial shards alone"
    assert [os.path.basename(s) for s in shard_dirs(three)] == ["text-00000", "text-00003"]
    for i in (1, 2):
        assert preprocess_text_main(text_args(manifests, three, tokenizer_path, *split(3, i))) == 0
    assert not glob.glob(str(three / ".*partial"))
    assert len(shard_dirs(one)) == 5
    assert_same_shards(one, three)
    tasks = [json.load(open(three / f"text.task-{i:05d}-of-00003.json")) for i in range(3)]
    assert [t["shards"] for t in tasks] == [["text-00000", "text-00003"], ["text-00001", "text-00004"], ["text-00002"]]
    assert sum(t["counts"]["samples"] for t in tasks) == 84 and sum(t["records"] for t in tasks) == 85
    assert len({t["run_key"] for t in tasks}) == 1
    rejected = sorted(line for i in range(3) for line in open(three / f"text.task-{i:05d}-of-00003.rejected.jsonl"))
    assert rejected == sorted(open(one / "text.rejected.jsonl")) and len(rejected) == 1
    assert build_blend_main([str(three), "--output", str(tmp_path / "b3.json")]) == 0
    assert build_blend_main([str(one), "--output", str(tmp_path / "b1.json")]) == 0
    b1, b3 = (json.load(open(tmp_path / f)) for f in ("b1.json", "b3.json"))
    assert [(os.path.basename(s["path"]), s["weight"]) for s in b1["shards"]] == \
        [(os.path.basename(s["path"]), s["weight"]) for s in b3["shards"]]


def test_failed_task_is_named_and_rerun_alone(tmp_path, tokenizer_path, monkeypatch, capsys):
    manifests = write_manifests(tmp_path, bad_parquet_row=35)  # record 80: shard 4, task 1's second shard
    one, out = tmp_path / "one", tmp_path / "out"
    assert preprocess_text_main(text_args(manifests, one, tokenizer_path)) == 0
    for i in (0, 2):
        assert preprocess_text_main(text_args(manifests, out, tokenizer_path, *split(3, i))) == 0
    env = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # Task 1 (from the Slurm variables) writes shard 1, then stops in shard 4 under --strict.
    assert preprocess_text_main(text_args(manifests, out, tokenizer_path, "--strict")) == 1
    assert [os.path.basename(s) for s in shard_dirs(out)] == ["text-00000", "text-00001", "text-00002", "text-00003"]
    capsys.readouterr()

    assert build_blend_main([str(out), "--output", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err
    assert "task(s) 1 of 3 have not finished" in err and "task 1: 1 of 2 shards written" in err
    assert "--num-tasks 3 --task-index I" in err and not os.path.exists(tmp_path / "b.json")
    assert inspect_shards_main([str(out), "--validate", "--show", "0"]) == 1
    assert "INCOMPLETE" in capsys.readouterr().out

    before = stamps(out)
    assert preprocess_text_main(text_args(manifests, out, tokenizer_path)) == 0  # task 1 again, from the env
    after = stamps(out)
    assert {k: after[k] for k in before} == before, "finished shards must be kept"
    assert sorted(after) == sorted(before) + ["text-00004"]
    assert_same_shards(one, out)
    assert build_blend_main([str(out), "--output", str(tmp_path / "b.json")]) == 0
    assert inspect_shards_main([str(out), "--show", "0"]) == 0

    # Another split into the same output is refused, naming the one it has.
    for k in env:
        monkeypatch.delenv(k, raising=False)
    capsys.readouterr()
    assert preprocess_text_main(text_args(manifests, out, tokenizer_path, *split(2, 0))) == 2
    err = capsys.readouterr().err.strip()
    assert "split into 3 task(s)" in err and "--num-tasks 3" in err and "\n" not in err


def test_output_of_a_runner_without_tasks_still_blends(tmp_path, manifests, tokenizer_path):
    out = tmp_path / "old"
    assert preprocess_text_main(text_args(manifests, out, tokenizer_path)) == 0
    for f in glob.glob(str(out / "text.run.json")) + glob.glob(str(out / "text.task-*.json")):
        os.remove(f)  # what the runner before tasks left: shards and text.rejected.jsonl
    assert build_blend_main([str(out), "--output", str(tmp_path / "b.json")]) == 0
    before = stamps(out)
    # Continued as task 1 of a split: its shards are kept (same run key), none rewritten.
    assert preprocess_text_main(text_args(manifests, out, tokenizer_path, *split(2, 1))) == 0
    assert stamps(out) == before


class RecordingBar(preprocess.tqdm):
    bars: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingBar.bars.append(self)


def test_progress_counts_only_new_work(tmp_path, manifests, tokenizer_path, monkeypatch):
    monkeypatch.setattr(preprocess, "tqdm", RecordingBar)
    out = tmp_path / "o"
    args = [a for a in text_args(manifests, out, tokenizer_path, *split(2, 1)) if a != "--no-progress"]
    assert preprocess_text_main(args) == 0  # task 1 of 2: shards 1 and 3, 40 records
    bar = RecordingBar.bars[-1]
    assert (bar.total, bar.initial, bar.n) == (40, 0, 40)
    shutil.rmtree(out / "text-00003")
    assert preprocess_text_main(args) == 0
    bar = RecordingBar.bars[-1]
    # The kept shard is where the bar starts (tqdm's rate and ETA use n - initial), not work done now.
    assert (bar.total, bar.initial, bar.n) == (40, 20, 40)
    assert Task(1, 2).shards(5) == [1, 3]
