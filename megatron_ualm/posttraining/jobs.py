"""Resumable generation jobs: what the post-training data builders (``pairs``: preference
pairs; ``reflection``: self-reflection records) share.

A job decodes items (prompts, plans) in fixed groups across model-parallel ranks, data-parallel
replicas and Slurm array tasks, and records each finished item in an append-only journal, so a
killed run resumes where it stopped and reruns produce the same bytes:

- inputs: JSON Lines records with ids (``read_inputs``), prompt turns as inference turns;
- files: codes and WAVs written atomically (``megatron_ualm.files``), the completion
  ``Journal``, the run's settings (``check_run``: a rerun with other settings is refused);
- the launch: TP / PP / DP initialisation, this replica's task, which groups are left;
- flags: decoding (the paper's audio settings), the task split, scorer placement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from megatron_ualm.files import atomic_file, atomic_json, read_jsonl

# ---------------------------------------------------------------------------------------------
# Inputs.

def read_inputs(paths: Sequence[str], audio_root: Optional[str], parse: Callable[[dict, str], Any]) -> list[tuple]:
    """``(index, id, "file:line", audio root, parse(record, root))`` of every record of the JSONL files.

    Args:
        paths: the files, read in order.
        audio_root: where relative audio paths resolve (default: each file's folder).
        parse: checks one record (a dict) and returns what the caller keeps; raises ``RecordError``.

    Raises:
        ValueError: a bad record (``file:line``, field, reason), an id given twice, or no records.
    """
    from megatron_ualm.data.errors import RecordError

    out: list[tuple] = []
    seen: dict[str, str] = {}
    for path in paths:
        root = audio_root or os.path.dirname(os.path.abspath(path))
        for line, rec in read_jsonl(path):
            where = f"{path}:{line}"
            try:
                if not isinstance(rec, dict):
                    raise RecordError(f"a record must be a JSON object, got {type(rec).__name__}")
                value = parse(rec, root)
            except RecordError as err:
                raise ValueError(str(err.at(where))) from None
            rid = str(rec.get("id", f"{len(out):06d}"))
            if rid in seen:
                raise ValueError(f"{where}: id {rid!r} is also the id of {seen[rid]}; give every record its own id")
            seen[rid] = where
            out.append((len(out), rid, where, root, value))
    if not out:
        raise ValueError(f"{', '.join(paths)}: no records")
    return out


def audio_path(turn, root: str) -> tuple[str, Optional[float], Optional[float]]:
    from megatron_ualm.data.errors import RecordError

    value, start, end = turn.audio, turn.start, turn.end
    if isinstance(value, dict):
        value, start, end = value.get("path"), value.get("start", start), value.get("end", end)
    if not isinstance(value, str) or not value:
        raise RecordError("must be an audio file path (or {\"path\", \"start\", \"end\"})", turn.field)
    path = value if os.path.isabs(value) else os.path.abspath(os.path.join(root, value))
    if not os.path.isfile(path):
        raise RecordError(f"audio file {path} does not exist (relative paths resolve against --audio-root, default "
                          "the prompt file's directory)", turn.field)
    return path, start, end


def check_codes(value: Any, field: str) -> Any:
    """Returns ``value`` if it is a ``[K][T]`` list of integer lists (T > 0), else raises ``RecordError``."""
    from megatron_ualm.data.errors import RecordError

    try:
        codes = np.asarray(value)
    except ValueError:  # ragged rows
        codes = None
    if codes is None or codes.ndim != 2 or codes.dtype.kind not in "iu" or codes.shape[1] == 0:
        raise RecordError("must be a K x T list of integer lists (equal-length rows, T > 0)", field)
    return value


def inference_turn(turn, root: str, audio_decoder: str = "soundfile"):
    """A prompt turn as an ``inference.Turn`` (audio in decoded at 16 kHz)."""
    import torch

    from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, load_audio
    from megatron_ualm.inference import Turn

    if turn.text is not None:
        return Turn(turn.role, text=turn.text)
    if turn.codes is not None:
        return Turn(turn.role, codes=torch.as_tensor(turn.codes, dtype=torch.long))
    path, start, end = audio_path(turn, root)
    wave = load_audio(path, AUDIO_IN_SAMPLE_RATE, start, end, turn.field, audio_decoder)
    return Turn(turn.role, audio=wave, sample_rate=AUDIO_IN_SAMPLE_RATE)


# ---------------------------------------------------------------------------------------------
# Files: codes and WAVs, the completion journal, the run's settings.

def save_codes(path: str, codes: Mapping[str, np.ndarray]) -> str:
    """Saves ``{name: [K, T] codes}`` as ``.npz`` (temporary name, rename); returns the path."""
    with atomic_file(path) as tmp:
        np.savez_compressed(tmp, **{k: np.asarray(v, dtype=np.int32) for k, v in codes.items()})
    return path


def save_wav(path: str, wave: np.ndarray, sample_rate: int) -> None:
    from megatron_ualm.inference.audio import write_wav

    with atomic_file(path) as tmp:
        write_wav(tmp, wave, sample_rate)


class Journal:
    """An append-only JSON Lines file of completion records, one line per finished item.

    Each line goes out in one write and is flushed to disk before the next item starts, so a
    kill leaves at most a torn last line; ``repair`` cuts it off before appending again.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def repair(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                f.truncate(end)

    def append(self, record: dict) -> None:
        with open(self.path, "ab") as f:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())


def journal_path(out: str, stem: str, task) -> str:
    """``<stem>.jsonl`` for a one-task run, ``<stem>.task-IIIII-of-NNNNN.jsonl`` per task otherwise."""
    return os.path.join(out, f"{stem}.jsonl" if task.count == 1 else f"{stem}.{task.tag}.jsonl")


def read_journals(out: str, stem: str) -> dict[int, dict]:
    """``{index: record}`` over every journal of ``stem`` in ``out`` (any task split).

    A torn last line (a kill mid-write, or a task still writing) is ignored.

    Raises:
        ValueError: a damaged line before the last.
    """
    pattern = re.compile(rf"^{re.escape(stem)}(\.task-\d+-of-\d+)?\.jsonl$")
    found: dict[int, dict] = {}
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        if not pattern.match(name):
            continue
        path = os.path.join(out, name)
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        for n, line in enumerate(lines[:-1], 1):  # the piece after the last newline is torn or empty
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise ValueError(f"{path}:{n} is not a complete record (the file was edited or damaged); delete that "
                                 "line and rerun to redo its item") from None
            found.setdefault(int(rec["index"]), rec)
    return found


def check_run(out: str, settings: dict, name: str = "run.json", started: bool = True) -> None:
    """Records the run's settings in ``<out>/<name>``, or refuses settings that differ from it.

    Args:
        started: whether ``out`` holds finished work of these settings; without any, other
            settings replace the recorded ones (a run refused before its first item, e.g. by a
            wrong tokenizer, does not lock the folder).
    """
    path = os.path.join(out, name)
    os.makedirs(out, exist_ok=True)
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if os.path.isfile(path):
        with open(path) as f:
            blob = json.load(f)
        if blob.get("key") != key and started:
            old = blob.get("settings", {})
            differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"--out {out} holds a run with other settings ({', '.join(differ)} differ; see {path}); "
                             "rerun with the same settings to resume, or write to a new --out")
        if blob.get("key") == key:
            return
    atomic_json(path, {"key": key, "settings": settings}, sort_keys=True)


def model_identity(args) -> dict:
    """What fixes the model's outputs: checkpoint (resolved iteration), tokenizer, codec, decoding."""
    from megatron_ualm.data.tokenizer import TextTokenizer
    from megatron_ualm.errors import CheckpointError
    from megatron_ualm.checkpoint_format import resolve_checkpoint

    try:
        load = os.path.abspath(resolve_checkpoint(args.load)) if args.load else None
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    decoding = {k: getattr(args, k) for k in DECODING_FLAGS}
    return dict(load=load, random_init=None if load else f"{args.flavor}:{args.seed}",
                tokenizer=TextTokenizer(args.tokenizer).sha256,
                codec=os.path.abspath(args.codec) if args.codec else None, codec_name=args.codec_name,
                bf16=args.bf16, batch_size=args.batch_size, seed=args.seed, decoding=decoding)


# ---------------------------------------------------------------------------------------------
# The launch: model-parallel groups, tasks, the writer.

@dataclass
class Launch:
    """This process's place in the run.

    Attributes:
        task: the share of the groups this data-parallel replica decodes.
        tasks: the shares of every replica of this launch.
        writer: the first rank of its model-parallel group (scores and writes).
        rank: global rank.
    """

    task: Any
    tasks: list
    writer: bool
    rank: int


def start_launch(args) -> Launch:
    """Initialises TP / PP (and data-parallel replicas) and this replica's task.

    The outer split comes from ``--num-tasks`` / ``--task-index`` or a Slurm array (not from
    ``RANK`` / ``SLURM_PROCID``: those are this launch's model ranks); each data-parallel
    replica is one task of it.
    """
    import torch
    from megatron.core import parallel_state

    from megatron_ualm import api
    from megatron_ualm.data.tasks import Task

    api.initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
    outer = args.outer_task
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    tasks = [Task(outer.index * dp + r, outer.count * dp, f"{outer}, data-parallel replica {r} of {dp}")
             for r in range(dp)]
    writer = (parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_pipeline_model_parallel_rank() == 0)
    return Launch(tasks[dp_rank], tasks, writer, torch.distributed.get_rank())


def broadcast(obj):
    """``obj`` of global rank 0 on every rank."""
    import torch

    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def journals_on_every_rank(out: str, stem: str) -> dict[int, dict]:
    """``read_journals`` once every rank got here (all writes done), read by rank 0, on every rank."""
    import torch

    torch.distributed.barrier()
    return broadcast(read_journals(out, stem) if torch.distributed.get_rank() == 0 else None)


def done_items(launch: Launch, out: str, stem: str) -> set[int]:
    """The finished items (every rank agrees): writers cut their torn lines, rank 0 reads."""
    if launch.writer:
        Journal(journal_path(out, stem, launch.task)).repair()
    return set(journals_on_every_rank(out, stem))


def task_groups(num_items: int, batch_size: int, task, done: set) -> list[tuple[int, list[int]]]:
    """``(group number, item indices)`` of ``task`` with an unfinished item (group k: task k mod N)."""
    out = []
    for k, start in enumerate(range(0, num_items, batch_size)):
        items = list(range(start, min(start + batch_size, num_items)))
        if k % task.count == task.index and any(i not in done for i in items):
            out.append((k, items))
    return out


def task_items(num_items: int, batch_size: int, task) -> int:
    """How many items ``task`` owns in all."""
    return sum(len(g) for _, g in task_groups(num_items, batch_size, task, set()))


# ---------------------------------------------------------------------------------------------
# Command-line pieces shared with the reflection builder.

DECODING_FLAGS = ("cfg_weight", "no_cfg", "audio_temperature", "audio_top_k", "text_temperature", "text_top_p",
                  "max_new_tokens", "max_audio_seconds", "min_audio_seconds")


def add_decoding_args(parser: argparse.ArgumentParser, text_temperature: float, min_audio_seconds: float) -> None:
    d = parser.add_argument_group("decoding (audio: the paper's settings)")
    d.add_argument("--cfg-weight", type=float, default=3.0, help="classifier-free guidance weight for audio (paper: 3)")
    d.add_argument("--no-cfg", action="store_true", help="no unconditional stream")
    d.add_argument("--audio-temperature", type=float, default=0.8, help="codebook temperature (paper: 0.8)")
    d.add_argument("--audio-top-k", type=int, default=20, help="codebook top-k (paper: 20)")
    d.add_argument("--text-temperature", type=float, default=text_temperature,
                   help=f"text temperature, 0 = greedy (default {text_temperature:g})")
    d.add_argument("--text-top-p", type=float, default=0.95, help="text nucleus mass")
    d.add_argument("--max-new-tokens", type=int, default=256, help="text ids per text message")
    d.add_argument("--max-audio-seconds", type=float, default=10.0, help="longest audio message")
    d.add_argument("--min-audio-seconds", type=float, default=min_audio_seconds,
                   help=f"the model may end audio only after this (default {min_audio_seconds:g})")


def check_decoding_args(parser: argparse.ArgumentParser, args) -> None:
    if not 0 <= args.min_audio_seconds <= args.max_audio_seconds or args.max_audio_seconds <= 0:
        parser.error("give 0 <= --min-audio-seconds <= --max-audio-seconds, --max-audio-seconds > 0")
    if args.max_new_tokens < 1 or args.text_temperature < 0 or args.audio_temperature < 0:
        parser.error("--max-new-tokens must be >= 1 and the temperatures >= 0")


def decoding_params(args, seed: int):
    """``GenerationParams`` of the flags, sampling seeded with ``seed``."""
    from megatron_ualm.inference import GenerationParams, SamplingParams

    return GenerationParams(
        text=SamplingParams(args.text_temperature, 0, args.text_top_p),
        audio=SamplingParams(args.audio_temperature, args.audio_top_k, 1.0),
        cfg_weight=None if args.no_cfg else args.cfg_weight, max_new_tokens=args.max_new_tokens,
        max_audio_seconds=args.max_audio_seconds, min_audio_seconds=args.min_audio_seconds, seed=seed)


def add_task_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "tasks", "Split the work across launches writing into the same --out (Slurm array tasks: the defaults "
                 "come from SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID); data-parallel replicas of one launch "
                 "split each task further. Group k of --batch-size prompts (records) goes to task k mod N.")
    g.add_argument("--num-tasks", type=int, metavar="N", help="number of tasks (default: the Slurm array's, else 1)")
    g.add_argument("--task-index", type=int, metavar="I", help="this task, 0..N-1 (default: the Slurm array's, else 0)")


def resolve_outer_task(parser: argparse.ArgumentParser, args) -> None:
    from megatron_ualm.data.tasks import TaskError, resolve_task

    array_env = {k: v for k, v in os.environ.items() if k.startswith("SLURM_ARRAY_")}
    try:
        args.outer_task = resolve_task(args.num_tasks, args.task_index, array_env)
    except TaskError as err:
        parser.error(str(err))


def scorer_device() -> str:
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def fail(message: str) -> "SystemExit":
    """Prints ``error: message`` and returns the exit (status 2, as the data tools' user errors)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(2)


def tool_main(parse_args: Callable[[Optional[Sequence[str]]], argparse.Namespace],
              run: Callable[[argparse.Namespace], None], argv: Optional[Sequence[str]] = None) -> int:
    """A generation job's command line: quiet warnings, parse, run; a ``ValueError`` is one ``error:`` line."""
    from megatron_ualm.compat import quiet

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    quiet.install()  # before Megatron-Core is imported: its fallback warnings become one line
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as err:
        raise fail(str(err)) from None
    return 0
