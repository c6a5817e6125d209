"""The GPU codec path, run on CPU: workers decode audio, the main process holds the one codec."""

from __future__ import annotations

import filecmp
import glob
import json
import os

import numpy as np
import pytest
import torch

from megatron_ualm.data.cli import preprocess_generation_main
from megatron_ualm.data.codec import CodecSpec, XCodec


def shard_files(out) -> list[str]:
    shards = sorted(p for p in glob.glob(os.path.join(str(out), "generation-[0-9]*")) if os.path.isdir(p))
    return [os.path.join(os.path.basename(s), f) for s in shards for f in sorted(os.listdir(s))]


def test_codec_spec_counts_frames_like_the_model(codec_dir):
    codec = XCodec(codec_dir, device="cpu")
    spec = codec.spec()
    assert isinstance(spec, CodecSpec) and spec.identity() == codec.identity()
    model = codec.model
    for n in (1, 319, 320, 3200, 15999, 16000, 16001, 23456):
        expected = int(model.semantic_model._get_feat_extract_output_lengths(torch.tensor(n + 2 * model.pad)))
        assert spec.num_frames(n) == max(expected, 0) == codec.num_frames(n), n
    with pytest.raises(RuntimeError, match="holds only the codec's spec"):
        spec.encode([np.zeros(16000, np.float32)])


def test_encode_in_main_writes_the_per_worker_shards(tmp_path, tokenizer_path, codec_dir, audio_dir, monkeypatch,
                                                     capsys):
    # Equal lengths recur (batched together), clip windows, and bad records, over three shards.
    names = [f"wav{i % 6}.wav" for i in range(22)] + ["missing.wav", "corrupt.wav"]
    recs = [{"audio": n, "caption": f"tone {i}", **({"start": 0.1, "end": 0.45} if i % 5 == 2 else {})}
            for i, n in enumerate(names)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    loads = tmp_path / "loads.txt"
    original = XCodec.__init__

    def counted(self, *args, **kwargs):  # inherited by forked workers: every process that loads a codec says so
        with open(loads, "a") as f:
            f.write(f"{os.getpid()}\n")
        original(self, *args, **kwargs)

    monkeypatch.setattr(XCodec, "__init__", counted)
    base = ["--input", str(tmp_path / "g.jsonl"), "--tokenizer", tokenizer_path, "--codec-path", codec_dir,
            "--audio-root", audio_dir, "--codec-device", "cpu", "--codec-batch-size", "3", "--records-per-shard", "10",
            "--workers", "2", "--no-progress"]
    summaries = {}
    for mode in ("--no-encode-in-main", "--encode-in-main"):
        loads.write_text("")
        capsys.readouterr()
        assert preprocess_generation_main([*base, mode, "--output", str(tmp_path / mode)]) == 0
        summaries[mode] = json.loads(capsys.readouterr().out)
        summaries[mode]["codec_loads"] = len(set(loads.read_text().split()))
    assert summaries["--no-encode-in-main"]["codec_loads"] == 3  # the main process and each worker
    assert summaries["--encode-in-main"]["codec_loads"] == 1  # the main process only
    assert "this process runs the codec" in summaries["--encode-in-main"]["workers"]
    assert summaries["--encode-in-main"]["samples"] == 22 and summaries["--encode-in-main"]["rejected"] == 2
    a, b = tmp_path / "--no-encode-in-main", tmp_path / "--encode-in-main"
    files = shard_files(a)
    assert files == shard_files(b) and len([f for f in files if f.endswith("codes.bin")]) == 3
    for f in files + ["generation.rejected.jsonl"]:
        assert filecmp.cmp(a / f, b / f, shallow=False), f
