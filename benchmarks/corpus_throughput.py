"""Corpora read in place: records/s per worker from WebDataset tars vs the same clips as loose files.

The same LAION-like clips (10 s, 48 kHz FLAC, a caption each) are preprocessed twice by
``preprocess_understanding`` (decode, resample to 16 kHz, tokenise, store 16 kHz PCM; no codec,
so reading is the largest part of the work):

- **loose**: one file per clip and a JSONL manifest ``{"sound": path, "conversations": ...}``;
- **tar**: WebDataset tars (``key.flac`` + ``key.json``, written by ``webdataset.TarWriter``)
  read in place with ``--preset laion-audio-630k``.

Each is run with 1 and 2 workers, alternating, and the best of ``--repeats`` runs is shown (a
first untimed run pays imports and warms the page cache), as wall time and as records per CPU
second of the tool's processes (user + system time, which other jobs on a shared machine
disturb much less than the wall clock). The *cold cache* rows drop the corpus files (only
those) from the page cache before each run (``posix_fadvise(DONTNEED)``), so clips are read
from disk: many small files against a few sequential archives. Then peak memory (max RSS) of one-worker runs over the same records in few large tars
and in many small ones, in fresh processes: it must not grow with the number of tars. Prints a
table; record it in benchmarks/RESULTS.md.

    python benchmarks/corpus_throughput.py [--workdir DIR] [--clips 192] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

from data_corpus import WORDS, train_tokenizer

QUESTION = "Describe the sound in detail."


def write_corpus(root: str, clips: int, seconds: float, per_tar: int) -> tuple[str, str]:
    """Loose 48 kHz FLAC clips + a JSONL manifest, and the same clips as tars of ``per_tar``.

    Returns:
        (manifest path, tar brace pattern).
    """
    import webdataset as wds

    loose, tars = os.path.join(root, "loose"), os.path.join(root, f"tars{per_tar}")
    os.makedirs(loose, exist_ok=True)
    os.makedirs(tars, exist_ok=True)
    rng, words = np.random.default_rng(0), np.random.default_rng(1)  # captions do not depend on cached clips
    manifest = os.path.join(root, "loose.jsonl")
    n_tars = (clips + per_tar - 1) // per_tar
    pattern = os.path.join(tars, f"laion-{{000000..{n_tars - 1:06d}}}.tar")
    sink, lines = None, []
    for i in range(clips):
        key = f"{i:08d}"
        path = os.path.join(loose, f"{key}.flac")
        if not os.path.exists(path):
            t = np.arange(int(seconds * 48000)) / 48000
            x = 0.2 * np.sin(2 * np.pi * (100 + 3 * i) * t) + 0.05 * rng.standard_normal(t.shape)
            sf.write(path, np.stack([x, 0.8 * x], 1).astype(np.float32), 48000, format="FLAC")
        caption = " ".join(words.choice(WORDS, int(words.integers(5, 25))))
        lines.append(json.dumps({"sound": path, "conversations": [
            {"from": "human", "value": f"<sound>\n{QUESTION}"}, {"from": "gpt", "value": caption}]}))
        if i % per_tar == 0:
            if sink is not None:
                sink.close()
            sink = wds.TarWriter(os.path.join(tars, f"laion-{i // per_tar:06d}.tar"))
        with open(path, "rb") as f:
            sink.write({"__key__": key, "flac": f.read(), "json": {"text": [caption]}})
    sink.close()
    with open(manifest, "w") as f:
        f.write("\n".join(lines) + "\n")
    return manifest, pattern


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def evict(paths: list[str]) -> None:
    """Drops these files (only these) from the page cache, so the next run reads them from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(argv: list[str], out: str) -> tuple[float, float]:
    """Wall and CPU seconds of one in-process run (the caller warms up and repeats)."""
    from megatron_ualm.data.cli import preprocess_understanding_main

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert preprocess_understanding_main([*argv, "--output", out, "--no-progress"]) == 0
    return time.perf_counter() - t0, cpu_seconds() - c0


PEAK = """
import resource, sys
from megatron_ualm.data.cli import preprocess_understanding_main
assert preprocess_understanding_main(sys.argv[1:]) == 0
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(argv: list[str], out: str) -> float:
    """Max RSS (MiB) of a fresh process running the tool with one worker (in-process)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    res = subprocess.run([sys.executable, "-c", PEAK, *argv, "--output", out, "--no-progress"], env=env,
                         capture_output=True, text=True, check=True)
    line = next(l for l in res.stdout.splitlines() if l.startswith("MAXRSS"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where the corpus and outputs go (default: a temporary directory)")
    parser.add_argument("--clips", type=int, default=192)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the best is shown)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = args.workdir or tempfile.mkdtemp(prefix="ualm_corpus_bench_")
    os.makedirs(root, exist_ok=True)
    tok = train_tokenizer(os.path.join(root, "tok.json"))
    manifest, pattern = write_corpus(root, args.clips, args.seconds, per_tar=64)
    _, small = write_corpus(root, args.clips, args.seconds, per_tar=4)
    common = ["--tokenizer", tok, "--n-mels", "128", "--window-seconds", "30", "--records-per-shard", "64"]
    loose_mb = sum(os.path.getsize(os.path.join(root, "loose", f)) for f in os.listdir(os.path.join(root, "loose")))
    print(f"corpus: {args.clips} clips of {args.seconds:g} s, 48 kHz stereo FLAC ({loose_mb / 2**20:.0f} MiB); "
          f"understanding shards (16 kHz PCM), 64 records per shard; {os.cpu_count()} CPUs")
    print("| input | workers | s | records/s | records/s per worker | records per CPU-s |")
    print("| --- | --- | --- | --- | --- | --- |")
    runs = (("loose files + JSONL", ["--input", manifest]),
            ("WebDataset tars (64 per tar)", ["--input", pattern, "--preset", "laion-audio-630k"]))
    clips = [os.path.join(root, "loose", f) for f in sorted(os.listdir(os.path.join(root, "loose")))]
    tars = [os.path.join(os.path.dirname(pattern), f) for f in sorted(os.listdir(os.path.dirname(pattern)))]
    for workers, cold in ((1, False), (2, False), (1, True)):
        # Both inputs alternate over the repeats, so drift in the machine's load hits them alike;
        # the best of the repeats is reported (the first run of each pays imports and warms the page cache).
        best = {name: (float("inf"), float("inf")) for name, _ in runs}
        for rep in range(args.repeats + 1):
            for name, inputs in runs:
                if cold:
                    evict(clips + tars)
                wall, cpu = timed([*inputs, *common, "--workers", str(workers)], os.path.join(root, "out"))
                if rep:
                    best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        for name, _ in runs:
            s, cpu = best[name]
            print(f"| {name}{', cold cache' if cold else ''} | {workers} | {s:.2f} | {args.clips / s:.1f} | "
                  f"{args.clips / s / workers:.1f} | "
                  f"{args.clips / cpu:.1f} |", flush=True)
    print()
    print("| input (1 worker, fresh process) | tars | max RSS MiB |")
    print("| --- | --- | --- |")
    print(f"| loose files + JSONL | - | {peak_rss_mib(['--input', manifest, *common], os.path.join(root, 'o')):.0f} |")
    for per_tar, pat in ((64, pattern), (4, small)):
        n = (args.clips + per_tar - 1) // per_tar
        rss = peak_rss_mib(["--input", pat, "--preset", "laion-audio-630k", *common], os.path.join(root, "o"))
        print(f"| WebDataset tars, {per_tar} clips each | {n} | {rss:.0f} |", flush=True)


if __name__ == "__main__":
    main()
