"""DALI and soundfile+soxr decode the same clips to the same 16 kHz signal."""

import os

import numpy as np
import pytest

from megatron_ualm.data.audio import load_audio
from megatron_ualm.data.errors import RecordError


@pytest.mark.parametrize("name", ["wav3.wav", "stereo.flac", "clip.ogg"])
def test_dali_matches_soundfile(audio_dir, name):
    path = os.path.join(audio_dir, name)
    ref = load_audio(path, 16000, decoder="soundfile")
    got = load_audio(path, 16000, decoder="dali")
    assert got.dtype == np.float32 and got.shape == ref.shape
    # Same decode (lossless WAV/FLAC; Vorbis decoders may differ in the last bits), same soxr.
    np.testing.assert_allclose(got, ref, atol=1e-3 if name.endswith(".ogg") else 1e-6)


def test_dali_cuts_start_end_and_reads_bytes(audio_dir):
    path = os.path.join(audio_dir, "clip.ogg")
    full = load_audio(path, 16000, decoder="dali")
    with open(path, "rb") as f:
        cut = load_audio(f.read(), 16000, start=0.2, end=0.9, decoder="dali")
    # Cut at the file's own rate (22.05 kHz), then resampled: the same span within a sample.
    assert abs(cut.shape[0] - 11200) <= 1
    np.testing.assert_allclose(cut[100:-100], full[3200 + 100:3200 + cut.shape[0] - 100], atol=2e-3)


def test_dali_errors_name_the_file_and_field(audio_dir):
    with pytest.raises(RecordError, match="cannot decode audio .*corrupt.wav"):
        load_audio(os.path.join(audio_dir, "corrupt.wav"), 16000, decoder="dali")
    with pytest.raises(RecordError, match="past the end"):
        load_audio(os.path.join(audio_dir, "wav0.wav"), 16000, start=30.0, decoder="dali")
    with pytest.raises(ValueError, match="decoder"):
        load_audio(os.path.join(audio_dir, "wav0.wav"), 16000, decoder="ffmpeg")


def test_understanding_tool_with_dali(tmp_path, audio_dir, tokenizer_path):
    from megatron_ualm.data.cli import preprocess_understanding_main
    from megatron_ualm.data.shards import ShardReader

    out = tmp_path / "und"
    rc = preprocess_understanding_main([
        "--input", os.path.join(audio_dir, "und.jsonl"), "--output", str(out), "--tokenizer", tokenizer_path,
        "--n-mels", "16", "--window-seconds", "2", "--records-per-shard", "100", "--no-progress",
        "--audio-decoder", "dali"])
    assert rc == 0
    shards = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(shards) == 1 and len(ShardReader(str(shards[0]))) > 0
