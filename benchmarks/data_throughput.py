"""Dataset throughput from one CPU worker: packed rows/s and tokens/s at sequence length 4096.

Builds shards with the preprocessing tools from synthetic manifests (text, generation with
precomputed codes, understanding with 10 s clips stored as PCM and as log-mel), then times
``UALMDataset.__getitem__`` (+ ``collate_packed``) in this process with one torch thread,
the way one data-loader worker runs. Target: >= 50k packed tokens/s per worker without
audio feature work (the 7B model consumes ~10k tokens/s per H100).

    python benchmarks/data_throughput.py [--workdir DIR] [--seq-length 4096] [--rows 200]
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import numpy as np
import torch

from data_corpus import generation_manifest, text_manifest, train_tokenizer, understanding_manifest, write_clips


def build_shards(work: str) -> dict:
    from megatron_ualm.data.cli import (preprocess_generation_main, preprocess_text_main,
                                        preprocess_understanding_main)

    tok = train_tokenizer(os.path.join(work, "tokenizer.json"))
    clips = write_clips(os.path.join(work, "clips"), 20)
    common = ["--tokenizer", tok, "--no-progress", "--workers", "2"]
    out = {}
    jobs = {
        "text": (preprocess_text_main, text_manifest(os.path.join(work, "text.jsonl"), 3000), []),
        "generation": (preprocess_generation_main, generation_manifest(os.path.join(work, "gen.jsonl"), clips, 1500, codes=True),
                       ["--codec", "precomputed", "--num-codebooks", "8", "--codebook-size", "1024", "--frame-rate", "50"]),
        "understanding_pcm": (preprocess_understanding_main, understanding_manifest(os.path.join(work, "und.jsonl"), clips, 400), []),
        "understanding_mel": (preprocess_understanding_main, os.path.join(work, "und.jsonl"), ["--audio-in-storage", "mel"]),
    }
    for name, (main, manifest, extra) in jobs.items():
        out[name] = os.path.join(work, name)
        if not glob.glob(os.path.join(out[name], "*-[0-9]*")):
            assert main(["--input", manifest, "--output", out[name], "--records-per-shard", "100000", *common, *extra]) == 0
    return out


def time_rows(dataset, rows: int, seq: int, vocab, mask: bool) -> tuple[float, float, float]:
    """(rows/s, tokens/s counting non-pad positions, fill) over ``rows`` items + collate(b=1)."""
    from megatron_ualm.data.batch import collate_packed

    dataset[0]  # warm-up (lazy feature extractor)
    t0, used = time.perf_counter(), 0
    for i in range(rows):
        item = dataset[i % len(dataset)]
        used += int(item["tokens"].numel())
        collate_packed([item], seq, vocab, attention_mask=mask)
    dt = time.perf_counter() - t0
    return rows / dt, used / dt, used / (rows * (seq + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ualm_data_bench"))
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    shards = build_shards(args.workdir)
    torch.set_num_threads(1)

    from megatron.core.datasets.utils import Split

    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.data.blend import build_datasets, find_shards, plan_blend
    from megatron_ualm.data.dataset import UALMDataset, UALMDatasetConfig
    from megatron_ualm.data.shards import ShardReader
    from megatron_ualm.vocab import UALMVocab

    vocab = UALMVocab(151665, 152064, 8, 1024)
    audio_in = AudioInConfig(128, 30)
    kwargs = dict(random_seed=1, sequence_length=args.seq_length, split="100,0,0", vocab=vocab, audio_in=audio_in,
                  path_to_cache=None, cfg_condition_dropout=0.05)
    print(f"seq_length={args.seq_length}, one process, torch threads=1, collate b=1")
    print(f"{'data':<34}{'rows/s':>9}{'tokens/s':>12}{'fill':>7}")
    for name, out in shards.items():
        (path,) = find_shards([out])
        reader = ShardReader(path)
        ds = UALMDataset(reader, path, np.arange(len(reader)), None, Split.train, UALMDatasetConfig(**kwargs))
        for mask in (True, False):
            rows = args.rows if "understanding" not in name else max(10, args.rows // 10)
            r, t, fill = time_rows(ds, rows, args.seq_length, vocab, mask)
            label = f"{name} ({'mask' if mask else 'cu_seqlens only'})"
            print(f"{label:<34}{r:>9.1f}{t:>12,.0f}{fill:>7.2f}")
    plan = plan_blend(find_shards([shards["text"], shards["generation"], shards["understanding_mel"]]))
    blend, _, _ = build_datasets(plan, kwargs, [args.rows, None, None])
    r, t, fill = time_rows(blend, args.rows, args.seq_length, vocab, True)
    print(f"{'blend (text+gen+und mel, mask)':<34}{r:>9.1f}{t:>12,.0f}{fill:>7.2f}")


if __name__ == "__main__":
    main()
