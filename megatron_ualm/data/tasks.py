"""Preprocessing split across tasks (Slurm array tasks, srun or torchrun ranks) into one output.

Shard ``k`` (records ``[k * R, (k + 1) * R)`` of the manifests, in order) belongs to task
``k mod N``. A shard's contents do not depend on N, so the union of N tasks' shards is
byte-identical to a one-task run, shard names never collide, and a rerun of one task redoes
only that task's missing shards. The output directory records the split:

    <output>/<name>.run.json                       the run's key, N, record and shard totals
                                                   (written when the first task starts)
    <output>/<name>.task-IIIII-of-NNNNN.json       a finished task: its shards and counts
    <output>/<name>.task-IIIII-of-NNNNN.rejected.jsonl   its skipped records (N > 1;
                                                   <name>.rejected.jsonl when N = 1)

``check_complete`` reads these before a blend is built and names the tasks still missing.
Outputs written before tasks existed (shards, no run or task files) count as complete.
This module is light (no torch): ``build_blend`` and ``inspect_shards`` import it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import textwrap
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from megatron_ualm.files import atomic_json

RUN_FORMAT = "ualm-preprocess-run"
TASK_FORMAT = "ualm-preprocess-task"
_SHARD_NAME = re.compile(r"^(?P<name>.+)-(?P<index>\d{5,})$")


class TaskError(ValueError):
    """A task split that cannot be resolved, or one that does not match the output's."""


class OutputConflict(ValueError):
    """The output directory holds shards of another run (other settings, inputs or tokenizer)."""


class IncompleteOutput(ValueError):
    """Shards of a run whose tasks have not all finished."""


@dataclass(frozen=True)
class Task:
    """One task of a split: shard ``k`` is this task's when ``k % count == index``.

    Attributes:
        index: this task, ``0 <= index < count``.
        count: number of tasks N.
        source: where the values came from (flags or environment variables), for messages.
    """

    index: int = 0
    count: int = 1
    source: str = "default"

    def shards(self, num_shards: int) -> list[int]:
        """Indices of this task's shards among ``num_shards``."""
        return owned_shards(self.index, self.count, num_shards)

    @property
    def tag(self) -> str:
        return f"task-{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"task {self.index} of {self.count} ({self.source})"


def owned_shards(index: int, count: int, num_shards: int, group_starts: Optional[Sequence[int]] = None) -> list[int]:
    """The shards task ``index`` of ``count`` writes.

    Args:
        index: the task.
        count: number of tasks N.
        num_shards: shards of the run.
        group_starts: first shard of each group of shards one task owns together (the shards
            cut from one large tar or row group, ``megatron_ualm.data.sources.layout``); None:
            every shard is its own group, so shard ``k`` is task ``k mod N``'s.
    """
    if group_starts is None:
        return list(range(index, num_shards, count))
    ends = [*group_starts[1:], num_shards]
    return [k for g in range(index, len(group_starts), count) for k in range(group_starts[g], ends[g])]


def _int_env(env: Mapping[str, str], key: str) -> Optional[int]:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise TaskError(f"environment variable {key}={value!r} is not an integer") from None


def _from_environment(env: Mapping[str, str]) -> Optional[tuple[Optional[int], Optional[int], str]]:
    """(count, index, source) from the launcher's variables, or None outside a launcher.

    Slurm array jobs first (the index counts from the array's first id, in its steps), then
    srun's task rank (only inside an srun step: the batch script itself also carries
    ``SLURM_NTASKS`` / ``SLURM_PROCID=0`` but is one process), then torchrun / MPI-style
    ``WORLD_SIZE`` / ``RANK``.
    """
    array_id = _int_env(env, "SLURM_ARRAY_TASK_ID")
    if array_id is not None:
        first = _int_env(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int_env(env, "SLURM_ARRAY_TASK_STEP") or 1
        count = _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        last = _int_env(env, "SLURM_ARRAY_TASK_MAX")
        if count is None and last is not None:  # Slurm releases before SLURM_ARRAY_TASK_COUNT
            count = (last - first) // step + 1
        if (array_id - first) % step:
            raise TaskError(f"SLURM_ARRAY_TASK_ID={array_id} is not SLURM_ARRAY_TASK_MIN={first} plus a multiple of "
                            f"SLURM_ARRAY_TASK_STEP={step}; pass --num-tasks and --task-index")
        return count, (array_id - first) // step, "SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID"
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID") is not None:
        return _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID"), "SLURM_NTASKS / SLURM_PROCID"
    if env.get("RANK") is not None or env.get("WORLD_SIZE") is not None:
        return _int_env(env, "WORLD_SIZE"), _int_env(env, "RANK"), "WORLD_SIZE / RANK"
    return None


def resolve_task(num_tasks: Optional[int] = None, task_index: Optional[int] = None,
                 environ: Optional[Mapping[str, str]] = None) -> Task:
    """The task this process runs: flags first, then the launcher's environment, else 0 of 1.

    Environment defaults, first found: ``SLURM_ARRAY_TASK_COUNT`` / ``SLURM_ARRAY_TASK_ID -
    SLURM_ARRAY_TASK_MIN`` (divided by ``SLURM_ARRAY_TASK_STEP``), ``SLURM_NTASKS`` /
    ``SLURM_PROCID`` inside an srun step, ``WORLD_SIZE`` / ``RANK``. A flag given alone takes
    the other value from the environment.

    Args:
        num_tasks: ``--num-tasks`` (None: from the environment).
        task_index: ``--task-index`` (None: from the environment).
        environ: the environment (default ``os.environ``).

    Raises:
        TaskError: a value out of range, or only one of the pair known.
    """
    env = os.environ if environ is None else environ
    found = _from_environment(env)
    env_count, env_index, env_source = found if found is not None else (None, None, None)
    count = num_tasks if num_tasks is not None else env_count
    index = task_index if task_index is not None else env_index
    given = [f for f, v in (("--num-tasks", num_tasks), ("--task-index", task_index)) if v is not None]
    source = " and ".join(given + ([env_source] if env_source and len(given) < 2 else [])) or "default"
    if count is None and index is None:
        return Task(0, 1, "default: one task")
    if count is None or index is None:
        missing = "--num-tasks" if count is None else "--task-index"
        raise TaskError(f"{missing} is needed too (found only {source}); give both --num-tasks N and --task-index I")
    if count < 1:
        raise TaskError(f"the number of tasks must be >= 1, got {count} ({source})")
    if not 0 <= index < count:
        raise TaskError(f"task index {index} is not in [0, {count}) ({source}); a Slurm array for N tasks is "
                        f"--array=0-{count - 1}, and a rerun of one task passes --num-tasks {count} --task-index I")
    return Task(index, count, source)


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--num-tasks`` / ``--task-index`` with the launcher defaults (every preprocessing tool)."""
    group = parser.add_argument_group("tasks", textwrap.fill(
        "Split one run across tasks writing into the same --output (Slurm array tasks, srun or "
                 "torchrun ranks). Shard k goes to task k mod N; the union of all tasks equals a one-task "
                 "run byte for byte; rerunning one task resumes only that task. Defaults come from "
                 "SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else SLURM_NTASKS / "
                 "SLURM_PROCID inside srun, else WORLD_SIZE / RANK, else 1 / 0. A finished task writes "
                 "<output>/<name>.task-IIIII-of-NNNNN.json; build_blend refuses a set with tasks missing.", 88))
    group.add_argument("--num-tasks", type=int, metavar="N", help="number of tasks (default: from the launcher, else 1)")
    group.add_argument("--task-index", type=int, metavar="I", help="this task, 0..N-1 (default: from the launcher, else 0)")


def task_device(requested: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """The torch device of this task's codec: the task's own GPU when several are visible.

    ``cuda`` (or None with CUDA present) becomes ``cuda:<local rank>`` when the process sees
    several GPUs and the launcher set ``LOCAL_RANK`` or ``SLURM_LOCALID``; one visible GPU
    (an array task with ``--gpus 1``) stays ``cuda``. Other values are returned unchanged.
    """
    import torch

    env = os.environ if environ is None else environ
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        return device
    local = _int_env(env, "LOCAL_RANK")
    local = _int_env(env, "SLURM_LOCALID") if local is None else local
    visible = torch.cuda.device_count()
    return f"cuda:{local % visible}" if local is not None and visible > 1 else "cuda"


def run_file(output: str, name: str) -> str:
    return os.path.join(output, f"{name}.run.json")


def task_file(output: str, name: str, task: Task) -> str:
    return os.path.join(output, f"{name}.{task.tag}.json")


def rejected_file(output: str, name: str, task: Task) -> str:
    """Where a task lists its skipped records (``<name>.rejected.jsonl`` for a one-task run)."""
    if task.count == 1:
        return os.path.join(output, f"{name}.rejected.jsonl")
    return os.path.join(output, f"{name}.{task.tag}.rejected.jsonl")


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise IncompleteOutput(f"{path} is not valid JSON ({err}); delete it and rerun the task that wrote it") from None


def _task_files(output: str, name: str) -> dict[tuple[int, int], str]:
    """``{(index, count): path}`` of the finished-task files of ``name`` in ``output``."""
    pattern = re.compile(rf"^{re.escape(name)}\.task-(\d{{5,}})-of-(\d{{5,}})\.json$")
    found = {}
    for path in glob.glob(os.path.join(glob.escape(output), f"{glob.escape(name)}.task-*-of-*.json")):
        m = pattern.match(os.path.basename(path))
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = path
    return found


def _rerun_hint(count: int) -> str:
    return (f"rerun each with the same command plus --num-tasks {count} --task-index I (finished shards are "
            "kept), then try again")


def check_split(output: str, name: str, task: Task) -> None:
    """Refuses a task whose N differs from the split the output already has (a cheap early check).

    Raises:
        TaskError: naming the output's N and how to rerun one of its tasks.
    """
    blob = _read_json(run_file(output, name)) if os.path.isdir(output) else None
    counts = {c for _, c in _task_files(output, name)} | ({int(blob["num_tasks"])} if blob else set())
    others = sorted(counts - {task.count})
    if others:
        raise TaskError(f"--output {output} is split into {', '.join(map(str, others))} task(s) for '{name}' "
                        f"but this is {task}; tasks of one output must agree on N: rerun a task of that split "
                        f"with --num-tasks {others[0]} --task-index I, or write to a new --output")


def begin(output: str, name: str, task: Task, run_key: str, num_shards: int, records: int,
          group_starts: Optional[Sequence[int]] = None) -> None:
    """Registers a task in the output (checks the run and the split, writes the run file).

    ``group_starts`` (see ``owned_shards``) is kept in the run file for ``problems``.

    Raises:
        OutputConflict: the output holds another run's run file.
        TaskError: the output is split into another number of tasks.
    """
    path = run_file(output, name)
    blob = _read_json(path)
    if blob is not None and blob.get("run_key") != run_key:
        raise OutputConflict(f"--output {output} holds another run's '{name}' shards ({path} has run key "
                             f"{blob.get('run_key')}, this run {run_key}: other tokenizer, codec, settings, "
                             "inputs or records per shard); write to a new --output or delete it")
    check_split(output, name, task)
    if blob is None:
        atomic_json(path, {"format": RUN_FORMAT, "version": 1, "name": name, "run_key": run_key,
                          "num_tasks": task.count, "num_shards": num_shards, "records": records,
                          **({"group_starts": list(group_starts)} if group_starts is not None else {})})


def finish(output: str, name: str, task: Task, run_key: str, shards: Sequence[str], summary: dict,
           records: int) -> str:
    """Writes the finished-task file (last, after every shard and the rejected list).

    Returns:
        Its path.
    """
    path = task_file(output, name, task)
    atomic_json(path, {"format": TASK_FORMAT, "version": 1, "name": name, "run_key": run_key,
                      "task_index": task.index, "num_tasks": task.count, "records": records,
                      "shards": [os.path.basename(s) for s in shards],
                      "counts": {k: summary[k] for k in ("samples", "rejected", "tokens")},
                      "rejected": os.path.basename(rejected_file(output, name, task))})
    return path


def unfinish(output: str, name: str, task: Task) -> None:
    """Removes a task's finished file before it writes shards again (a crash then shows)."""
    try:
        os.remove(task_file(output, name, task))
    except FileNotFoundError:
        pass


def problems(output: str, name: str) -> list[str]:
    """What keeps the ``name`` shards in ``output`` from being a complete set (empty: complete).

    Outputs without run or task files (written before tasks existed) count as complete.
    """
    run = _read_json(run_file(output, name))
    finished = _task_files(output, name)
    counts = sorted({c for _, c in finished} | ({int(run["num_tasks"])} if run else set()))
    if not counts:
        return []
    where = f"{output}: '{name}'"
    if len(counts) > 1:
        return [f"{where} mixes task splits N = {', '.join(map(str, counts))} (task files {name}.task-*-of-*.json); "
                "rerun the missing tasks of one split or write the run to a new --output"]
    count = counts[0]
    keys = {run["run_key"]} if run else set()
    found = []
    for (index, _), path in sorted(finished.items()):
        blob = _read_json(path) or {}
        keys.add(blob.get("run_key"))
        for shard in blob.get("shards", []):
            if not os.path.isfile(os.path.join(output, shard, "shard.json")):
                found.append(f"{where}: task {index} finished but its shard {shard} is missing; "
                             f"{_rerun_hint(count)}")
    if len(keys) > 1:
        found.append(f"{where} holds tasks of different runs (run keys {sorted(map(str, keys))}); "
                     "write each run to its own --output")
    missing = [i for i in range(count) if (i, count) not in finished]
    if missing:
        detail = ""
        if run:
            owned = [owned_shards(i, count, run["num_shards"], run.get("group_starts")) for i in missing]
            done = [sum(os.path.isfile(os.path.join(output, f"{name}-{k:05d}", "shard.json")) for k in ks)
                    for ks in owned]
            total = [len(ks) for ks in owned]
            detail = " (" + ", ".join(f"task {i}: {d} of {t} shards written" for i, d, t in
                                      zip(missing[:8], done, total)) + (", ..." if len(missing) > 8 else "") + ")"
        shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        found.append(f"{where} is incomplete: task(s) {shown} of {count} have not finished{detail}; "
                     f"{_rerun_hint(count)}")
    return found


def check_complete(shard_dirs: Sequence[str]) -> None:
    """Refuses shards whose run has tasks missing or incomplete, naming them and how to rerun.

    Args:
        shard_dirs: shard directories (``<output>/<name>-00007``); each output and name among
            them is checked once.

    Raises:
        IncompleteOutput: one line per incomplete output.
    """
    groups = set()
    for d in shard_dirs:
        m = _SHARD_NAME.match(os.path.basename(os.path.normpath(d)))
        if m:
            groups.add((os.path.dirname(os.path.abspath(d)), m.group("name")))
    found = [p for output, name in sorted(groups) for p in problems(output, name)]
    if found:
        raise IncompleteOutput("\n".join(found))
