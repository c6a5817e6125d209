"""Preprocessing throughput: records/s per worker for text and audio families.

- text: tokenise + write shards, 1 and 2 workers (scaling with worker count);
- generation: decode 10 s WAV clips + X-Codec encode, with a full-size randomly initialised
  X-Codec (default ``XcodecConfig``: DAC acoustic encoder + HuBERT-base semantic model, the
  shapes of hf-audio/xcodec-hubert-general; speed does not depend on the weights) on CPU,
  and on CUDA when present;
- understanding: decode + store 16 kHz PCM, or + Whisper log-mel (128 mels, 30 s windows);
- tasks x workers: text records/s of 1 and 2 concurrent task processes (``--num-tasks``) into
  one output, each with 1 and 2 workers; the window runs from the first task's start to the
  last task's end (imports excluded, they are paid once per task on a cluster too);
- generation with 2 workers, per-worker codecs vs ``--encode-in-main`` (workers decode, the
  main process encodes: the GPU layout; on CPU it has one encoding process instead of two).

    python benchmarks/preprocess_throughput.py [--workdir DIR] [--text-records 4000] [--clips 8]
        [--only text,understanding,generation,tasks,feed]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from data_corpus import generation_manifest, text_manifest, train_tokenizer, understanding_manifest, write_clips


def timed(main, argv: list[str], out: str) -> float:
    """Seconds of the second of two identical runs (the first pays imports and model loads)."""
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its summary
            assert main([*argv, "--output", out, "--no-progress"]) == 0
    return time.perf_counter() - t0


TASK_PROCESS = """
import json, sys, time
import megatron_ualm.data.records, megatron_ualm.data.shards  # imports before the clock starts
from megatron_ualm.data import cli
t0 = time.time()
rc = getattr(cli, sys.argv[1])(sys.argv[2:])
print(json.dumps({"rc": rc, "t0": t0, "t1": time.time()}))
"""


def timed_tasks(main_name: str, argv: list[str], num_tasks: int, out: str) -> float:
    """Seconds from the first task's start to the last one's end, ``num_tasks`` processes at once."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", TASK_PROCESS, main_name, *argv, "--output", out, "--no-progress",
                               "--num-tasks", str(num_tasks), "--task-index", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
             for i in range(num_tasks)]
    spans = []
    for p in procs:
        stdout, _ = p.communicate()
        result = json.loads(stdout.strip().splitlines()[-1])
        assert p.returncode == 0 and result["rc"] == 0, stdout
        spans.append((result["t0"], result["t1"]))
    return max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)


def full_size_xcodec(path: str) -> str:
    from transformers import XcodecConfig, XcodecModel

    if not os.path.isdir(path):
        torch.manual_seed(0)
        XcodecModel(XcodecConfig()).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ualm_pre_bench"))
    parser.add_argument("--text-records", type=int, default=4000)
    parser.add_argument("--clips", type=int, default=8, help="10 s clips per audio measurement")
    parser.add_argument("--only", default="text,understanding,generation,tasks,feed",
                        help="comma-separated sections to run (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    os.makedirs(args.workdir, exist_ok=True)
    w = lambda *p: os.path.join(args.workdir, *p)

    from megatron_ualm.data.cli import (preprocess_generation_main, preprocess_text_main,
                                        preprocess_understanding_main)

    tok = train_tokenizer(w("tokenizer.json"))
    text = text_manifest(w("text.jsonl"), args.text_records)
    clips = write_clips(w("clips"), args.clips)
    print(f"{os.cpu_count()} CPUs; torch {torch.__version__}; cuda={torch.cuda.is_available()}")
    print(f"{'job':<56}{'records/s':>11}{'per worker':>12}")
    per = str(max(1, args.text_records // 8))
    for workers in (1, 2) if "text" in only else ():
        dt = timed(preprocess_text_main, ["--input", text, "--tokenizer", tok, "--workers", str(workers),
                                          "--records-per-shard", per], w("out_text"))
        print(f"{f'text, {workers} worker(s) (~900 tokens/record)':<56}{args.text_records / dt:>11.0f}"
              f"{args.text_records / dt / workers:>12.0f}")

    for tasks in (1, 2) if "tasks" in only else ():
        for workers in (1, 2):
            dt = timed_tasks("preprocess_text_main", ["--input", text, "--tokenizer", tok, "--workers", str(workers),
                                                      "--records-per-shard", per], tasks, w("out_tasks"))
            print(f"{f'text, {tasks} task(s) x {workers} worker(s)':<56}{args.text_records / dt:>11.0f}"
                  f"{args.text_records / dt / (tasks * workers):>12.0f}")

    und = understanding_manifest(w("und.jsonl"), clips, args.clips)
    for storage in ("pcm16", "mel") if "understanding" in only else ():
        dt = timed(preprocess_understanding_main, ["--input", und, "--tokenizer", tok, "--audio-in-storage", storage],
                   w("out_und"))
        print(f"{f'understanding 10 s clips, {storage}, 1 worker':<56}{args.clips / dt:>11.2f}{args.clips / dt:>12.2f}")

    if not {"generation", "feed"} & only:
        return
    codec = full_size_xcodec(w("xcodec_full"))
    gen = generation_manifest(w("gen.jsonl"), clips, args.clips)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices if "generation" in only else ():
        argv = ["--input", gen, "--tokenizer", tok, "--codec-path", codec, "--codec-device", device,
                "--codec-batch-size", "8"]
        dt = timed(preprocess_generation_main, argv, w("out_gen"))
        print(f"{f'generation 10 s clips, X-Codec full size, {device}':<56}{args.clips / dt:>11.2f}"
              f"{args.clips / dt:>12.2f}   ({10 * args.clips / dt:.1f}x real time, incl. model load)")

    for device in devices if "feed" in only else ():
        for mode in ("--no-encode-in-main", "--encode-in-main"):
            argv = ["--input", gen, "--tokenizer", tok, "--codec-path", codec, "--codec-device", device,
                    "--codec-batch-size", "8", "--workers", "2", "--records-per-shard", str(max(1, args.clips // 2)),
                    mode]
            dt = timed(preprocess_generation_main, argv, w("out_feed"))
            label = "codec in main, 2 decode workers" if mode == "--encode-in-main" else "2 workers, codec each"
            print(f"{f'generation 10 s clips, {device}, {label}':<56}{args.clips / dt:>11.2f}{args.clips / dt / 2:>12.2f}"
                  f"   ({10 * args.clips / dt:.1f}x real time, incl. model loads)")


if __name__ == "__main__":
    main()
