"""Preprocessing throughput: records/s per worker for text and audio families.

- text: tokenise + write shards, 1 and 2 workers (scaling with worker count);
- generation: decode 10 s WAV clips + X-Codec encode, with a full-size randomly initialised
  X-Codec (default ``XcodecConfig``: DAC acoustic encoder + HuBERT-base semantic model, the
  shapes of hf-audio/xcodec-hubert-general; speed does not depend on the weights) on CPU,
  and on CUDA when present;
- understanding: decode + store 16 kHz PCM, or + Whisper log-mel (128 mels, 30 s windows).

    python benchmarks/preprocess_throughput.py [--workdir DIR] [--text-records 4000] [--clips 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

from data_corpus import generation_manifest, text_manifest, train_tokenizer, understanding_manifest, write_clips


def timed(main, argv: list[str], out: str) -> float:
    """Seconds of the second of two identical runs (the first pays imports and model loads)."""
    for _ in range(2):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        assert main([*argv, "--output", out, "--no-progress"]) == 0
    return time.perf_counter() - t0


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
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    w = lambda *p: os.path.join(args.workdir, *p)

    from megatron_ualm.data.cli import (preprocess_generation_main, preprocess_text_main,
                                        preprocess_understanding_main)

    tok = train_tokenizer(w("tokenizer.json"))
    text = text_manifest(w("text.jsonl"), args.text_records)
    clips = write_clips(w("clips"), args.clips)
    print(f"{os.cpu_count()} CPUs; torch {torch.__version__}; cuda={torch.cuda.is_available()}")
    print(f"{'job':<46}{'records/s':>11}{'per worker':>12}")
    per = str(max(1, args.text_records // 8))
    for workers in (1, 2):
        dt = timed(preprocess_text_main, ["--input", text, "--tokenizer", tok, "--workers", str(workers),
                                          "--records-per-shard", per], w("out_text"))
        print(f"{f'text, {workers} worker(s) (~900 tokens/record)':<46}{args.text_records / dt:>11.0f}"
              f"{args.text_records / dt / workers:>12.0f}")

    und = understanding_manifest(w("und.jsonl"), clips, args.clips)
    for storage in ("pcm16", "mel"):
        dt = timed(preprocess_understanding_main, ["--input", und, "--tokenizer", tok, "--audio-in-storage", storage],
                   w("out_und"))
        print(f"{f'understanding 10 s clips, {storage}, 1 worker':<46}{args.clips / dt:>11.2f}{args.clips / dt:>12.2f}")

    codec = full_size_xcodec(w("xcodec_full"))
    gen = generation_manifest(w("gen.jsonl"), clips, args.clips)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        argv = ["--input", gen, "--tokenizer", tok, "--codec-path", codec, "--codec-device", device,
                "--codec-batch-size", "8"]
        dt = timed(preprocess_generation_main, argv, w("out_gen"))
        print(f"{f'generation 10 s clips, X-Codec full size, {device}':<46}{args.clips / dt:>11.2f}"
              f"{args.clips / dt:>12.2f}   ({10 * args.clips / dt:.1f}x real time, incl. model load)")


if __name__ == "__main__":
    main()
