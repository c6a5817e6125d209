"""The parallel, resumable shard-writing runner shared by the preprocessing tools.

Records are numbered in manifest order across all inputs; shard ``i`` holds records
``[i * records_per_shard, (i + 1) * records_per_shard)``, so the output does not depend on the
number of workers. Each shard is written by one worker under a temporary name and renamed
into place when complete (``ShardWriter``); a rerun skips shards that exist and removes
leftovers of a crashed run. A bad record is skipped and counted (its reason goes to the
shard's ``rejected.jsonl``) or, with ``strict``, stops the run naming the manifest line.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.shards import REJECTED, ShardWriter, read_sidecar


def iter_manifest(path: str) -> Iterator[tuple[str, Any]]:
    """``(source, raw record)`` of a JSONL (text lines) or Parquet (row dicts) manifest.

    ``source`` is ``file:line`` (1-based) for JSONL and ``file:row N`` (0-based) for Parquet.
    Blank JSONL lines are not records.
    """
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for rec in batch.to_pylist():
                yield f"{path}:row {row}", rec
                row += 1
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", line


@dataclass
class Job:
    """One preprocessing run.

    Attributes:
        converter: ``(class, kwargs)`` that build the family's ``Converter`` in each worker.
        inputs: manifest paths, read in order.
        output: the shard directory.
        name: shard name prefix (shards are ``<output>/<name>-00000`` ...).
        records_per_shard: manifest records per shard (kept and rejected).
        workers: worker processes (1: in this process).
        strict: stop at the first bad record instead of skipping it.
        progress: show a progress bar.
    """

    converter: tuple
    inputs: list
    output: str
    name: str
    records_per_shard: int = 1000
    workers: int = 1
    strict: bool = False
    progress: bool = True

    def shard_path(self, index: int) -> str:
        return os.path.join(self.output, f"{self.name}-{index:05d}")


class StrictStop(RuntimeError):
    """A bad record under ``strict``."""


_WORKER: dict = {}


def _init_worker(converter: tuple, counter) -> None:
    if counter is not None:
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


def write_shard(path: str, records: list, first_record: int, run: dict, strict: bool,
                progress: Callable[[int], None] = _count) -> dict:
    """Converts a slice of records and writes them as one shard.

    Args:
        path: final shard directory.
        records: ``(source, raw)`` records.
        first_record: global index of ``records[0]``.
        run: sidecar fields that identify the run (``run_key``, inputs).
        strict: raise ``StrictStop`` on the first bad record.
        progress: called with the number of records handled so far, in steps.

    Returns:
        The sidecar.
    """
    converter = _WORKER["converter"]
    writer = ShardWriter(path, converter.family, {**converter.header(), **run,
                                                  "source": {**run["source"], "first_record": first_record,
                                                             "records": len(records)}},
                         audio_storage=converter.audio_storage, codes=converter.codes)
    try:
        step = 64
        for b in range(0, len(records), step):
            for source, result in converter.convert_batch(records[b:b + step]):
                if not isinstance(result, RecordError):
                    try:
                        writer.add(result)
                        continue
                    except RecordError as err:
                        result = err.at(source)
                if strict:
                    raise StrictStop(str(result))
                writer.reject(result)
            progress(min(step, len(records) - b))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def run_key(job: Job, header: dict) -> str:
    """Hash of everything that decides shard contents: converter identity, inputs, sharding."""
    inputs = [(os.path.abspath(p), os.path.getsize(p)) for p in job.inputs]
    cls, kwargs = job.converter
    # Settings that change contents (rich-caption mode, storage, ...) count; where the codec
    # runs and how many clips share a call do not, so a run may resume on another device.
    settings = {k: v for k, v in kwargs.items() if k not in ("codec", "codec_batch_size")}
    payload = json.dumps([cls.__name__, header, settings, inputs, job.records_per_shard], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _chunks(job: Job) -> Iterator[tuple[int, list]]:
    chunk, index = [], 0
    for path in job.inputs:
        for item in iter_manifest(path):
            chunk.append(item)
            if len(chunk) == job.records_per_shard:
                yield index, chunk
                chunk, index = [], index + 1
    if chunk:
        yield index, chunk


def run(job: Job) -> dict:
    """Runs a preprocessing job to completion (or to the first bad record under ``strict``).

    Returns:
        Summary: shards written / kept, samples, rejected, reasons, tokens.

    Raises:
        StrictStop: under ``strict``, naming the manifest line and field.
        ValueError: the output holds shards of a different run.
    """
    from tqdm import tqdm

    for path in job.inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"manifest {path} does not exist")
    os.makedirs(job.output, exist_ok=True)
    for stale in glob.glob(os.path.join(job.output, f".{job.name}-*.partial")):
        shutil.rmtree(stale, ignore_errors=True)  # a crashed run's half-written shard

    _init_worker(job.converter, None)
    header = _WORKER["converter"].header()
    run_fields = {"run_key": run_key(job, header),
                  "source": {"manifests": [os.path.abspath(p) for p in job.inputs],
                             "records_per_shard": job.records_per_shard}}
    summary = dict(shards_written=0, shards_kept=0, samples=0, rejected=0, tokens=0)
    reasons: dict[str, int] = {}

    def account(sidecar: dict) -> None:
        counts = sidecar["counts"]
        for key in ("samples", "rejected", "tokens"):
            summary[key] += counts[key]
        for reason, n in sidecar.get("reject_reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + n

    bar = tqdm(desc=f"{job.name}", unit="rec", disable=not job.progress, smoothing=0.1, file=sys.stderr)

    def missing_shards() -> Iterator[tuple[str, list, int]]:
        """Shards still to write, streamed from the manifests (kept shards are accounted)."""
        for index, records in _chunks(job):
            path = job.shard_path(index)
            if not os.path.isdir(path):
                yield path, records, index * job.records_per_shard
                continue
            meta = read_sidecar(path)
            if meta.get("run_key") != run_fields["run_key"]:
                raise ValueError(
                    f"{path} was written by a different run (other tokenizer, codec, settings, inputs "
                    f"or records per shard); write to a new --output or delete it"
                )
            summary["shards_kept"] += 1
            account(meta)
            bar.update(len(records))

    if job.workers <= 1:
        for path, records, first in missing_shards():
            account(write_shard(path, records, first, run_fields, job.strict, bar.update))
            summary["shards_written"] += 1
    else:
        import torch

        # fork starts workers at once; a parent that touched CUDA (a GPU codec) must spawn.
        ctx = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
        counter = ctx.Value("q", 0)
        with ctx.Pool(job.workers, initializer=_init_worker, initargs=(job.converter, counter)) as pool:
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
                for args in missing_shards():
                    collect(2 * job.workers - 1)
                    pending.append(pool.apply_async(write_shard, (*args, run_fields, job.strict)))
                collect(0)
            except BaseException:
                pool.terminate()
                raise
        bar.update(counter.value - shown)
    bar.close()
    summary["reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    _merge_rejected(job)
    return summary


def _merge_rejected(job: Job) -> None:
    """Concatenates the shards' reasons into ``<output>/<name>.rejected.jsonl`` (atomically)."""
    target = os.path.join(job.output, f"{job.name}.rejected.jsonl")
    tmp = target + ".partial"
    with open(tmp, "w") as out:
        for shard in sorted(glob.glob(os.path.join(job.output, f"{job.name}-[0-9]*"))):
            path = os.path.join(shard, REJECTED)
            if os.path.isfile(path):
                with open(path) as f:
                    shutil.copyfileobj(f, out)
    os.replace(tmp, target)
