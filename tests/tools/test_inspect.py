"""inspect_shards: readable records, statistics, and validation that catches broken shards."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np

from megatron_ualm.data.cli import inspect_shards_main


def copy_first(out: str, tmp_path) -> str:
    src = os.path.dirname(sorted(glob.glob(os.path.join(out, "*-[0-9]*", "shard.json")))[0])
    dst = str(tmp_path / os.path.basename(src))
    shutil.copytree(src, dst)
    return dst


def test_prints_interleaved_records_and_stats(corpus, capsys):
    assert inspect_shards_main([corpus["generation"], corpus["understanding"], "--show", "8"]) == 0
    out = capsys.readouterr().out
    assert "<audio-out 125 frames x 8, 2.50 s>" in out  # the 2.5 s stereo FLAC at 50 Hz
    assert "<audio-in 0.5 s, 13 frames>" in out
    assert "[user] (condition) '" in out and '"family": "understanding"' in out
    assert "all shards valid" in out


def test_validation_catches_truncated_data(corpus, tmp_path, capsys):
    shard = copy_first(corpus["generation"], tmp_path)
    with open(os.path.join(shard, "codes.bin"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 6)
    assert inspect_shards_main([shard]) == 1
    assert "codes.bin" in capsys.readouterr().out


def test_validation_catches_codes_out_of_range(corpus, tmp_path, capsys):
    shard = copy_first(corpus["generation"], tmp_path)
    codes = np.memmap(os.path.join(shard, "codes.bin"), dtype=np.uint16, mode="r+")
    codes[3] = 64
    codes.flush()
    del codes
    assert inspect_shards_main([shard]) == 1
    assert "codes outside [0, 64)" in capsys.readouterr().out


def test_validation_catches_sidecar_mismatch(corpus, tmp_path, capsys):
    shard = copy_first(corpus["text"], tmp_path)
    meta = json.load(open(os.path.join(shard, "shard.json")))
    meta["counts"]["text_tokens"] += 1
    json.dump(meta, open(os.path.join(shard, "shard.json"), "w"))
    assert inspect_shards_main([shard]) == 1
    assert "counts.text_tokens" in capsys.readouterr().out


def test_validation_catches_misaligned_streams(corpus, tmp_path, capsys):
    shard = copy_first(corpus["understanding"], tmp_path)
    other = os.path.dirname(sorted(glob.glob(os.path.join(corpus["text"], "*-[0-9]*", "shard.json")))[0])
    for ext in ("bin", "idx"):
        shutil.copy(os.path.join(other, f"text.{ext}"), os.path.join(shard, f"text.{ext}"))
    assert inspect_shards_main([shard]) == 1
    assert "not aligned with the text stream" in capsys.readouterr().out
