"""Helpers of the corpus-reader tests: tiny clips, the tools' common flags, shard comparison."""

from __future__ import annotations

import glob
import io
import json
import os

import numpy as np
import soundfile as sf

UNDERSTANDING = ["--n-mels", "16", "--window-seconds", "2"]
QUESTION = "Describe the sound in detail."


def clip(seconds: float, rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.shape)
    return np.stack([x] * channels, axis=1).astype(np.float32) if channels > 1 else x.astype(np.float32)


def encode(x: np.ndarray, rate: int = 16000, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt)
    return buf.getvalue()


def common(tokenizer_path: str, per_shard: int, *extra: str) -> list[str]:
    return ["--tokenizer", tokenizer_path, "--no-progress", "--records-per-shard", str(per_shard), *extra]


def shard_dirs(out) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(str(out), "*-[0-9]*")) if os.path.isdir(p))


def data_files(shard: str) -> list[str]:
    return sorted(f for f in os.listdir(shard) if f.endswith((".bin", ".idx")))


def sidecar(shard: str) -> dict:
    """The shard's sidecar without what names the run (its key, inputs and their format)."""
    with open(os.path.join(shard, "shard.json")) as f:
        meta = json.load(f)
    meta.pop("run_key")
    source = meta.pop("source")
    meta["records"] = (source["first_record"], source["records"])
    return meta


def assert_same_shards(a, b) -> None:
    """``a`` and ``b`` hold the same shards: names, every data file byte for byte, and sidecars
    equal but for the run's identity."""
    sa, sb = shard_dirs(a), shard_dirs(b)
    assert [os.path.basename(s) for s in sa] == [os.path.basename(s) for s in sb]
    assert sa, f"no shards in {a}"
    for x, y in zip(sa, sb):
        assert data_files(x) == data_files(y)
        for f in data_files(x):
            with open(os.path.join(x, f), "rb") as fa, open(os.path.join(y, f), "rb") as fb:
                assert fa.read() == fb.read(), (x, f)
        assert sidecar(x) == sidecar(y)


def rejected(out, name: str) -> list[dict]:
    path = os.path.join(str(out), f"{name}.rejected.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def understanding_record(audio: str, answer: str, question: str = QUESTION, **extra) -> dict:
    return {"sound": audio, **extra, "conversations": [{"from": "human", "value": f"<sound>\n{question}"},
                                                       {"from": "gpt", "value": answer}]}
