"""The parallel, resumable shard-writing runner shared by the preprocessing tools.

Records are numbered in manifest order across all inputs; shard ``k`` holds records
``[k * records_per_shard, (k + 1) * records_per_shard)``, so the output depends neither on
the number of workers nor on the number of tasks (``megatron_ualm.data.tasks``: shard ``k``
is task ``k mod N``'s, and a task reads only its own shards' records). Each shard is written
under a temporary name and renamed into place when complete (``ShardWriter``); a rerun keeps
finished shards and removes the leftovers of a crashed one. Corpora read in place (WebDataset
tars, Lhotse, Hub Parquet, WavCaps: ``megatron_ualm.data.sources``) cut their shards from
units a task reads whole (``sources.layout``); their records are references that the
converting process reads. A bad record is skipped and
counted (its reason goes to the shard's ``rejected.jsonl``) or, with ``strict``, stops the
run naming the manifest line.

Records are converted in steps of ``STEP``. Where the codec runs once per task (a GPU,
``Job.encode_in_main``), CPU worker processes parse records and decode audio for each step
and the main process encodes the step's clips (``encode_audio_out``) and writes the shards;
otherwise every worker converts whole shards with its own converter.

This module imports torch and Megatron-Core only when it writes shards, so the tools check
manifests and paths before loading them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from tqdm import tqdm

from megatron_ualm.data import tasks
from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.sources.base import materialize
from megatron_ualm.data.sources.layout import Layout, Unit
from megatron_ualm.data.tasks import OutputConflict, Task
from megatron_ualm.files import atomic_file, partial_dir

STEP = 64
"""Records converted per call: bounds the clips a worker holds, and is the codec's batching scope."""

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or not JSONL / Parquet."""


class StrictStop(RuntimeError):
    """A bad record under ``strict``."""


@dataclass(frozen=True)
class Manifest:
    """An input file: its path, whether it is Parquet, and its record count."""

    path: str
    parquet: bool
    records: int


_BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")


def _count_jsonl(path: str) -> int:
    """Non-blank lines of a JSONL file, counted in 4 MiB blocks without parsing JSON."""
    count, tail = 0, b""
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            block = tail + block
            cut = block.rfind(b"\n") + 1
            lines, tail = block[:cut], block[cut:]
            count += lines.count(b"\n")
            if _BLANK_LINE.search(b"\n" + lines):  # rare: count the blank ones exactly
                count -= sum(1 for line in lines.split(b"\n")[:-1] if not line.strip())
    return count + (1 if tail.strip() else 0)


def open_manifest(path: str) -> Manifest:
    """Checks a manifest and counts its records (JSONL lines, or Parquet metadata rows).

    A file that is neither ``.parquet`` nor ``.jsonl`` / ``.ndjson`` is accepted when its first
    non-blank line is a JSON object (JSON Lines under another name).

    Raises:
        ManifestError: missing, a directory, unreadable Parquet, or not JSON Lines.
    """
    formats = "JSON Lines (.jsonl: one JSON object per line) or Parquet (.parquet)"
    if not os.path.exists(path):
        raise ManifestError(f"manifest {path} does not exist")
    if os.path.isdir(path):
        raise ManifestError(f"manifest {path} is a directory; give the manifest files ({formats}), e.g. {path}/*.jsonl")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for foreign bytes
            raise ManifestError(f"manifest {path} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
        return Manifest(path, True, int(rows))
    if not path.endswith(JSONL_SUFFIXES):
        with open(path, "rb") as f:
            head = f.read(1 << 20)  # the first line of a JSONL file; not a whole binary file
        lines = head.split(b"\n")
        first = next((i for i, line in enumerate(lines) if line.strip()), None)
        try:
            if first is None:
                ok = True  # empty: no records
            elif first == len(lines) - 1 and len(head) == 1 << 20:  # a longer first line: judge its start
                ok = lines[first].lstrip().startswith(b"{")
            else:
                ok = isinstance(json.loads(lines[first]), dict)
        except ValueError:
            ok = False
        if not ok:
            csv = " (for a CSV: pandas.read_csv(f).to_json(out, orient='records', lines=True))" \
                if path.endswith((".csv", ".tsv")) else ""
            raise ManifestError(f"manifest {path} is not {formats}: its first line is not a JSON object{csv}")
    return Manifest(path, False, _count_jsonl(path))


def open_manifests(paths: Sequence[str]) -> list[Manifest]:
    """``open_manifest`` of each input, in order."""
    return [open_manifest(p) for p in paths]


def iter_manifest(path: str) -> Iterator[tuple[str, Any]]:
    """``(source, raw record)`` of every record of a JSONL or Parquet manifest (see ``read_shards``)."""
    manifest = open_manifest(path)
    size = max(manifest.records, 1)
    for _, records in read_shards([manifest], size, [0]):
        yield from records


def _runs(first: int, n: int, per_shard: int, wanted: set) -> Iterator[tuple[int, int]]:
    """Local ``[a, b)`` runs of records ``first .. first + n - 1`` that lie in wanted shards."""
    for k in range(first // per_shard, (first + n - 1) // per_shard + 1 if n else 0):
        if k in wanted:
            a, b = max(first, k * per_shard), min(first + n, (k + 1) * per_shard)
            yield a - first, b - first


def _wanted_records(manifests: Sequence[Manifest], per_shard: int, wanted: set) -> Iterator[tuple[int, str, Any]]:
    """``(global index, source, raw)`` of the records in wanted shards, in manifest order.

    ``source`` is ``file:line`` (1-based) for JSONL and ``file:row N`` (0-based) for Parquet.
    Blank JSONL lines are not records; a line that is not UTF-8 comes as a ``RecordError``.
    Parquet row groups without a wanted record are not read.
    """
    if not wanted:
        return
    end = (max(wanted) + 1) * per_shard
    g = 0
    for m in manifests:
        if g >= end:
            return
        if m.parquet:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(m.path)
            row = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                runs = list(_runs(g + row, n, per_shard, wanted))
                if runs:
                    offset = 0
                    for batch in pf.iter_batches(batch_size=256, row_groups=[group]):
                        for a, b in _runs(g + row + offset, batch.num_rows, per_shard, wanted):
                            for j, rec in enumerate(batch.slice(a, b - a).to_pylist()):
                                yield g + row + offset + a + j, f"{m.path}:row {row + offset + a + j}", rec
                        offset += batch.num_rows
                row += n
            g += row
            continue
        with open(m.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if (g // per_shard) in wanted:
                    try:
                        raw: Any = line.decode("utf-8")
                    except UnicodeDecodeError as err:
                        raw = RecordError(f"the line is not UTF-8 text ({err.reason} at byte {err.start})")
                    yield g, f"{m.path}:{lineno}", raw
                g += 1
                if g >= end:
                    return


def read_shards(manifests: Sequence[Manifest], per_shard: int, wanted: Sequence[int]) -> Iterator[tuple[int, list]]:
    """``(shard index, [(source, raw), ...])`` of the wanted shards, in order."""
    index, chunk = None, []
    for g, source, raw in _wanted_records(manifests, per_shard, set(wanted)):
        if g // per_shard != index and chunk:
            yield index, chunk
            chunk = []
        index = g // per_shard
        chunk.append((source, raw))
    if chunk:
        yield index, chunk


@dataclass
class Job:
    """One preprocessing run (or one task of it).

    Attributes:
        converter: ``(class, kwargs)`` that build the family's ``Converter`` in each process.
        inputs: manifest paths, read in order.
        output: the shard directory.
        name: shard name prefix (shards are ``<output>/<name>-00000`` ...).
        records_per_shard: manifest records per shard (kept and rejected).
        workers: worker processes (1: in this process).
        strict: stop at the first bad record instead of skipping it.
        progress: show a progress bar.
        num_tasks: tasks the run is split into (None: from the launcher, see ``tasks.resolve_task``).
        task_index: this task (None: from the launcher).
        encode_in_main: with ``workers > 1``, workers decode audio and this process runs the
            codec (the converter's ``codec``, ``codec_batch_size``); None: when the codec is on CUDA.
        corpus: a ``megatron_ualm.data.sources`` reader (tars, Lhotse, Hub Parquet, WavCaps, or
            manifests with a field mapping) whose units and records replace the manifests';
            ``inputs`` are then its files. None: ``inputs`` are manifests read as they are.
    """

    converter: tuple
    inputs: list
    output: str
    name: str
    records_per_shard: int = 1000
    workers: int = 1
    strict: bool = False
    progress: bool = True
    num_tasks: Optional[int] = None
    task_index: Optional[int] = None
    encode_in_main: Optional[bool] = None
    corpus: Any = None

    def shard_path(self, index: int) -> str:
        return os.path.join(self.output, f"{self.name}-{index:05d}")


_WORKER: dict = {}


def _init_worker(converter: tuple, counter=None, child: bool = False) -> None:
    if child:
        import torch

        # One thread per worker process (workers = cores). It also keeps a forked child out of
        # the OpenMP pool its parent used, which GNU OpenMP cannot carry across fork().
        torch.set_num_threads(1)
    cls, kwargs = converter
    _WORKER["converter"] = cls(**kwargs)
    _WORKER["counter"] = counter


def _count(n: int) -> None:
    counter = _WORKER.get("counter")
    if counter is not None:
        with counter.get_lock():
            counter.value += n


def _convert(convert: Callable[[list], list], records: list) -> list:
    """``convert`` over the records that have a raw value; undecodable lines stay as their errors.

    Corpus records arrive as references and are read here, in the converting process.
    """
    records = materialize(records)
    ok = [r for r in records if not isinstance(r[1], RecordError)]
    done = iter(convert(ok) if ok else [])
    return [(source, raw.at(source)) if isinstance(raw, RecordError) else next(done) for source, raw in records]


def _store(writer, converted: list, strict: bool) -> None:
    """Adds the converted records to the shard in order; bad ones are rejected (or stop, ``strict``)."""
    for source, result in converted:
        if not isinstance(result, RecordError):
            try:
                writer.add(result)
                continue
            except RecordError as err:
                result = err.at(source)
        if strict:
            raise StrictStop(str(result))
        writer.reject(result)


def _writer(converter, path: str, first_record: int, num_records: int, run: dict):
    from megatron_ualm.data.shards import ShardWriter

    source = {**run["source"], "first_record": first_record, "records": num_records}
    return ShardWriter(path, converter.family, {**converter.header(), **run, "source": source},
                       audio_storage=converter.audio_storage, codes=converter.codes)


def write_shard(path: str, records: list, first_record: int, run: dict, strict: bool,
                progress: Callable[[int], None] = _count) -> dict:
    """Converts a slice of records and writes them as one shard (in this process's converter).

    Args:
        path: final shard directory.
        records: ``(source, raw)`` records.
        first_record: global index of ``records[0]``.
        run: sidecar fields that identify the run (``run_key``, inputs).
        strict: raise ``StrictStop`` on the first bad record.
        progress: called with the number of records handled, once per step.

    Returns:
        The sidecar.
    """
    converter = _WORKER["converter"]
    writer = _writer(converter, path, first_record, len(records), run)
    try:
        for b in range(0, len(records), STEP):
            step = records[b:b + STEP]
            _store(writer, _convert(converter.convert_batch, step), strict)
            progress(len(step))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _prepare(records: list) -> list:
    """A step converted up to the codec (in a CPU worker): parsed, tokenised, audio decoded."""
    from megatron_ualm.data.records import Converter

    converter = _WORKER["converter"]
    # Converter.convert_batch is the conversion without a codec pass; the generation
    # converter's own convert_batch adds that pass, which here runs in the main process.
    return _convert(lambda rs: Converter.convert_batch(converter, rs), records)


def run_key(job: Job, header: dict) -> str:
    """Hash of everything that decides shard contents: converter identity, inputs, sharding.

    Workers, tasks, and where the codec runs do not count, so a run may resume with other ones.
    """
    inputs = [(os.path.abspath(p), os.path.getsize(p)) for p in job.inputs]
    cls, kwargs = job.converter
    # Settings that change contents (rich-caption mode, storage, ...) count; where the codec
    # runs and how many clips share a call do not, so a run may resume on another device.
    settings = {k: v for k, v in kwargs.items() if k not in ("codec", "codec_batch_size")}
    key = [cls.__name__, header, settings, inputs, job.records_per_shard]
    if job.corpus is not None:  # manifests without a mapping keep the keys their outputs already have
        key.append(job.corpus.identity())
    payload = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _difference(meta: dict, header: dict, run: dict) -> str:
    """What differs between an existing shard's sidecar and this run, for the conflict message."""
    ours = {**header, **run}
    for key, what in (("tokenizer", "tokenizer"), ("codec", "codec"), ("audio_in", "audio-in settings")):
        a, b = meta.get(key) or {}, ours.get(key) or {}
        if a.get("sha256", a) != b.get("sha256", b):
            return f"{what} {a.get('path', a)} there, {b.get('path', b)} here"
    a, b = meta.get("source", {}), ours["source"]
    if a.get("manifests") != b["manifests"]:
        return f"manifests {a.get('manifests')} there, {b['manifests']} here"
    if a.get("records_per_shard") != b["records_per_shard"]:
        return f"--records-per-shard {a.get('records_per_shard')} there, {b['records_per_shard']} here"
    return "other settings, or manifests that changed size since"


def check_output(path: str) -> None:
    """Refuses an ``--output`` that cannot be a shard directory (an existing file)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputConflict(f"--output {path} is a file; give a directory for the shards")


def _pool(job: Job, converter: tuple, counter: bool):
    import torch

    # fork starts workers at once; a parent that touched CUDA (a GPU codec) must spawn.
    ctx = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    value = ctx.Value("q", 0) if counter else None
    return ctx.Pool(job.workers, initializer=_init_worker, initargs=(converter, value, True)), value


def run(job: Job, task: Optional[Task] = None, manifests: Optional[Sequence[Manifest]] = None) -> dict:
    """Runs a preprocessing job (one task of it) to completion, or to the first bad record under ``strict``.

    Args:
        job: the job.
        task: this task (None: ``tasks.resolve_task(job.num_tasks, job.task_index)``).
        manifests: ``open_manifests(job.inputs)`` when the caller checked them already.

    Returns:
        Summary: task, records, shards written / kept, samples, rejected, reasons, tokens.

    Raises:
        StrictStop: under ``strict``, naming the manifest line and field.
        ManifestError: a manifest is missing or not JSONL / Parquet.
        OutputConflict: the output holds shards of a different run.
        TaskError: the output is split into another number of tasks.
    """
    from megatron_ualm.data.shards import read_sidecar

    task = task or tasks.resolve_task(job.num_tasks, job.task_index)
    if job.corpus is None:
        manifests = list(manifests) if manifests is not None else open_manifests(job.inputs)
    check_output(job.output)
    os.makedirs(job.output, exist_ok=True)

    _init_worker(job.converter)
    converter = _WORKER["converter"]
    header = converter.header()
    source = {"manifests": [os.path.abspath(p) for p in job.inputs], "records_per_shard": job.records_per_shard}
    if job.corpus is not None:
        # The inputs as given (a brace range, not its thousand tars) and how they were read.
        source = {**source, "manifests": [os.path.abspath(p) for p in job.corpus.inputs], **job.corpus.identity()}
    run_fields = {"run_key": run_key(job, header), "source": source}
    per_shard = job.records_per_shard
    if job.corpus is not None:
        layout = job.corpus.layout(per_shard)  # counted from headers / metadata: no audio decoded
    else:
        layout = Layout([Unit(m.records, whole=False) for m in manifests], per_shard)
    total, num_shards, size = layout.records, layout.num_shards, layout.size
    mine = layout.task_shards(task)

    def ours(path: str) -> dict:
        """The sidecar of an existing shard, refused when another run wrote it."""
        try:
            meta = read_sidecar(path)
        except ValueError as err:  # a shard directory someone altered by hand
            raise OutputConflict(f"{err}; delete {path} and rerun to write it again") from None
        if meta.get("run_key") != run_fields["run_key"]:
            raise OutputConflict(f"--output {job.output} holds shards of another run ({os.path.basename(path)}: "
                                 f"{_difference(meta, header, run_fields)}); write to a new --output or delete it")
        return meta

    existing = sorted(p for p in os.listdir(job.output) if re.fullmatch(rf"{re.escape(job.name)}-\d{{5,}}", p))
    if existing:  # outputs of runners before tasks have no run file: compare with a shard
        ours(os.path.join(job.output, existing[0]))
    tasks.begin(job.output, job.name, task, run_fields["run_key"], num_shards, total, layout.group_starts)

    summary = dict(task=str(task), records=sum(size(k) for k in mine), records_kept=0, shards_written=0,
                   shards_kept=0, samples=0, rejected=0, tokens=0)
    reasons: dict[str, int] = {}

    def account(sidecar: dict) -> None:
        counts = sidecar["counts"]
        for key in ("samples", "rejected", "tokens"):
            summary[key] += counts[key]
        for reason, n in sidecar.get("reject_reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n

    todo = []
    for k in mine:
        path = job.shard_path(k)
        # A crashed run's half-written shard of this task (other tasks' may still be in progress).
        shutil.rmtree(partial_dir(path), ignore_errors=True)
        if os.path.isdir(path):
            account(ours(path))
            summary["shards_kept"] += 1
            summary["records_kept"] += size(k)
        else:
            todo.append(k)
    if todo:
        tasks.unfinish(job.output, job.name, task)
    print(f"[{job.name}] {task}: {len(mine)} of {num_shards} shards ({summary['records']} of {total} records), "
          f"{summary['shards_kept']} already written", file=sys.stderr)

    # The bar counts this run's work only: kept shards are its starting point, not instant progress.
    bar = tqdm(desc=job.name, unit="rec", total=summary["records"], initial=summary["records_kept"],
               disable=not job.progress, smoothing=0.1, file=sys.stderr)
    reader = job.corpus.read_shards(layout, todo) if job.corpus is not None else read_shards(manifests, per_shard, todo)
    shards = ((job.shard_path(k), records, layout.first(k)) for k, records in reader)
    encode_in_main = job.encode_in_main
    if encode_in_main is None:
        codec = getattr(converter, "codec", None)
        encode_in_main = codec is not None and str(getattr(codec, "device", "cpu")).startswith("cuda")
    summary["workers"] = ("none: all in this process" if job.workers <= 1 else
                          f"{job.workers} decode audio, this process runs the codec" if encode_in_main else
                          f"{job.workers}, each converting whole shards")
    try:
        if job.workers <= 1:
            for path, records, first in shards:
                account(write_shard(path, records, first, run_fields, job.strict, bar.update))
                summary["shards_written"] += 1
        elif encode_in_main:
            _feed_codec(job, converter, shards, run_fields, bar, account, summary)
        else:
            _per_worker(job, shards, run_fields, bar, account, summary)
    finally:
        bar.close()
    summary["reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    paths = [job.shard_path(k) for k in mine]
    summary["rejected_file"] = tasks.rejected_file(job.output, job.name, task)
    _merge_rejected(paths, summary["rejected_file"])
    tasks.finish(job.output, job.name, task, run_fields["run_key"], paths, summary, summary["records"])
    return summary


def _per_worker(job: Job, shards: Iterator, run_fields: dict, bar, account, summary: dict) -> None:
    """Each worker converts and writes whole shards with its own converter (and codec)."""
    pool, counter = _pool(job, job.converter, counter=True)
    with pool:
        pending: list = []
        shown = 0

        def collect(limit: int) -> None:
            """Waits until at most ``limit`` shards are in flight, accounting finished ones."""
            nonlocal shown
            while len(pending) > limit:
                time.sleep(0.2)
                bar.update(counter.value - shown)
                shown = counter.value
                for result in [r for r in pending if r.ready()]:
                    pending.remove(result)
                    account(result.get())
                    summary["shards_written"] += 1

        try:
            # Two shards per worker in flight bound the records held in memory.
            for path, records, first in shards:
                collect(2 * job.workers - 1)
                pending.append(pool.apply_async(write_shard, (path, records, first, run_fields, job.strict)))
            collect(0)
        except BaseException:
            pool.terminate()
            raise
    bar.update(counter.value - shown)


def _feed_codec(job: Job, converter, shards: Iterator, run_fields: dict, bar, account, summary: dict) -> None:
    """Workers decode audio step by step; this process encodes each step's clips and writes shards.

    At most ``2 * workers`` steps (of ``STEP`` records) are in flight, which bounds the clips
    held in memory. Steps come back in order, so shards are written as the per-worker path
    writes them, with the same codec batches (``encode_audio_out``).
    """
    from megatron_ualm.data.codec import encode_audio_out

    codec = getattr(converter, "codec", None)
    if codec is None:
        raise tasks.TaskError("encode_in_main needs a converter with a codec (not precomputed codes)")
    cls, kwargs = job.converter
    pool, _ = _pool(job, (cls, {**kwargs, "codec": codec.spec()}), counter=False)
    pending: collections.deque = collections.deque()
    writer = None

    def steps() -> Iterator[tuple]:
        for path, records, first in shards:
            for b in range(0, len(records), STEP):
                yield path, first, len(records), b, records[b:b + STEP]

    def store(item: tuple, result) -> None:
        nonlocal writer
        path, first, n, b, records = item
        if b == 0:
            writer = _writer(converter, path, first, n, run_fields)
        converted = encode_audio_out(result.get(), codec, converter.codec_batch_size)
        _store(writer, converted, job.strict)
        bar.update(len(records))
        if b + len(records) == n:
            account(writer.commit())
            writer = None
            summary["shards_written"] += 1

    with pool:
        try:
            for item in steps():
                pending.append((item, pool.apply_async(_prepare, (item[-1],))))
                while len(pending) > 2 * job.workers:
                    store(*pending.popleft())
            while pending:
                store(*pending.popleft())
        except BaseException:
            pool.terminate()
            if writer is not None:
                writer.abort()
            raise


def _merge_rejected(shards: Sequence[str], target: str) -> None:
    """Concatenates the shards' reasons into ``target`` (atomically)."""
    from megatron_ualm.data.shards import REJECTED

    with atomic_file(target) as tmp, open(tmp, "w") as out:
        for shard in shards:
            path = os.path.join(shard, REJECTED)
            if os.path.isfile(path):
                with open(path) as f:
                    shutil.copyfileobj(f, out)
