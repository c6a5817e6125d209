"""Synthetic manifests at realistic sizes for the data benchmarks (shared by both scripts).

Text records of a few hundred to ~2k tokens, 10 s clips (16 kHz WAV) for generation and
understanding, and precomputed random codes (K=8, card=1024, 50 Hz) for generation shards.
"""

from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf

WORDS = ("dog bark rain wind engine car bird song piano guitar speech crowd water drip door slam siren bell "
         "clock tick laugh baby cry thunder storm train horn wave beach fire crackle the a of and in to").split()


def train_tokenizer(path: str) -> str:
    """A small BPE over the benchmark words; tokenisation cost is close to a real BPE's per token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    rng = np.random.default_rng(0)
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 50)) for _ in range(2000)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    tok.save(path)
    return path


def text_manifest(path: str, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = lambda k: " ".join(rng.choice(WORDS, int(k)))
            if i % 2:
                rec = {"text": words(rng.integers(200, 2000))}
            else:
                rec = {"messages": [{"role": "user", "content": words(rng.integers(20, 200))},
                                    {"role": "assistant", "content": words(rng.integers(100, 1500))}]}
            f.write(json.dumps(rec) + "\n")
    return path


def write_clips(directory: str, n: int, seconds: float = 10.0) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = os.path.join(directory, f"clip{i}.wav")
        if not os.path.exists(p):
            sf.write(p, (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        paths.append(p)
    return paths


def generation_manifest(path: str, clips: list[str], n: int, codes: bool = False, seed: int = 2) -> str:
    """Caption + clip records; with ``codes``, precomputed random codes (10 s = 500 frames)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"caption": " ".join(rng.choice(WORDS, int(rng.integers(5, 30))))}
            if codes:
                rec["codes"] = rng.integers(0, 1024, (8, 500)).tolist()
            else:
                rec["audio"] = clips[i % len(clips)]
            f.write(json.dumps(rec) + "\n")
    return path


def understanding_manifest(path: str, clips: list[str], n: int, seed: int = 3) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            q, a = (" ".join(rng.choice(WORDS, int(rng.integers(5, k)))) for k in (30, 120))
            f.write(json.dumps({"sound": clips[i % len(clips)],
                                "conversations": [{"from": "human", "value": f"<sound>\n{q}"},
                                                  {"from": "gpt", "value": a}]}) + "\n")
    return path
