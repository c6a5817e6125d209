"""The preprocessing tools on tiny real corpora: round trips, bad records, parallelism, resume."""

from __future__ import annotations

import filecmp
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, AudioInConfig, LogMel, load_audio, pcm_to_float
from megatron_ualm.data.cli import (preprocess_generation_main, preprocess_text_main,
                                    preprocess_understanding_main)
from megatron_ualm.data.codec import Codec, XCodec
from megatron_ualm.data.shards import ShardReader
from megatron_ualm.data.tokenizer import TextTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shards(out: str) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(out, "*-[0-9]*")) if os.path.isdir(p))


def records(out: str) -> list:
    return [r.document(d) for s in shards(out) for r in [ShardReader(s)] for d in range(len(r))]


def common(tokenizer_path):
    return ["--tokenizer", tokenizer_path, "--no-progress"]


@pytest.mark.parametrize("tool", ["preprocess_text", "preprocess_generation", "preprocess_understanding",
                                  "build_blend", "inspect_shards"])
def test_tool_help_runs_as_script(tool):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "usage:" in out and len(out) > 400


def test_understanding_help_states_the_audio_placement_rule(capsys):
    with pytest.raises(SystemExit):
        preprocess_understanding_main(["--help"])
    assert "without a <sound> marker gets the clip at the start of its first user turn" in \
        " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("use_sentencepiece", [False, True])
def test_text_round_trip(tmp_path, tokenizer_path, sentencepiece_path, use_sentencepiece):
    tok_path = sentencepiece_path if use_sentencepiece else tokenizer_path
    tok = TextTokenizer(tok_path)
    recs = [{"text": "dog bark in the rain"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what barks"},
                          {"role": "assistant", "content": "a dog"}]},
            {"conversations": [{"from": "human", "value": "siren"}, {"from": "gpt", "value": "bell"}]}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert preprocess_text_main(["--input", str(manifest), "--output", str(tmp_path / "o"), *common(tok_path)]) == 0
    got = records(str(tmp_path / "o"))
    assert [[(s.role, s.kind, s.data.tolist()) for s in doc] for doc in got] == [
        [("assistant", "text", tok.encode("dog bark in the rain"))],
        [("system", "text", tok.encode("be brief")), ("user", "text", tok.encode("what barks")),
         ("assistant", "text", tok.encode("a dog"))],
        [("user", "text", tok.encode("siren")), ("assistant", "text", tok.encode("bell"))],
    ]
    meta = json.load(open(os.path.join(shards(str(tmp_path / "o"))[0], "shard.json")))
    assert meta["family"] == "text" and meta["tokenizer"]["sha256"] == tok.sha256
    assert meta["counts"]["samples"] == 3
    assert meta["counts"]["text_tokens"] == sum(s.data.size for doc in got for s in doc)


def test_codec_frame_count_matches_encoder(codec_dir):
    codec = XCodec(codec_dir, device="cpu")
    rng = np.random.default_rng(0)
    for n in (3200, 15999, 16000, 16001, 16320, 23456):
        clip = (0.1 * rng.standard_normal(n)).astype(np.float32)
        assert codec.encode([clip])[0].shape == (8, codec.num_frames(n))


def test_generation_round_trip(tmp_path, tokenizer_path, codec_dir, audio_dir):
    recs = [{"audio": "stereo.flac", "caption": "a dog barks"},
            {"audio": os.path.join(audio_dir, "clip.ogg"), "start": 0.2, "end": 0.9, "caption": "rain",
             "rich_caption": {"keywords": ["rain"], "layout": "steady", "description": "light rain"}},
            {"audio": "wav3.wav", "caption": "bell"}]
    manifest = tmp_path / "g.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in recs))
    assert preprocess_generation_main(["--input", str(manifest), "--output", str(tmp_path / "o"),
                                       "--codec-path", codec_dir, "--audio-root", audio_dir,
                                       *common(tokenizer_path)]) == 0
    got = records(str(tmp_path / "o"))
    codec, tok = XCodec(codec_dir, device="cpu"), TextTokenizer(tokenizer_path)
    clips = [load_audio(os.path.join(audio_dir, "stereo.flac"), 16000),
             load_audio(os.path.join(audio_dir, "clip.ogg"), 16000, 0.2, 0.9),
             load_audio(os.path.join(audio_dir, "wav3.wav"), 16000)]
    assert clips[0].shape[0] == 40000  # 2.5 s of 44.1 kHz stereo -> 16 kHz mono
    assert clips[1].shape[0] == 11200
    for doc, clip in zip(got, clips):
        assert doc[0].role == "user" and doc[0].condition and doc[-1].kind == "audio_out"
        np.testing.assert_array_equal(doc[-1].data, codec.encode([clip])[0])
    assert [s.kind for s in got[1]] == ["text", "text", "audio_out"]  # caption, rich-caption plan, audio
    assert tok.decode(got[1][1].data) == tok.decode(tok.encode("Keywords: rain\nLayout: steady\nDescription: light rain"))
    meta = json.load(open(os.path.join(shards(str(tmp_path / "o"))[0], "shard.json")))
    assert meta["codec"]["num_codebooks"] == 8 and meta["codec"]["frame_rate"] == 50
    assert meta["counts"]["audio_out_frames"] == sum(d[-1].data.shape[1] for d in got)


def test_generation_from_parquet_audio_bytes(tmp_path, tokenizer_path, codec_dir, audio_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = open(os.path.join(audio_dir, "clip.ogg"), "rb").read()
    table = pa.Table.from_pylist([{"audio": {"bytes": data, "path": None}, "caption": "rain"}])
    pq.write_table(table, tmp_path / "g.parquet", compression="none", use_dictionary=False)
    assert preprocess_generation_main(["--input", str(tmp_path / "g.parquet"), "--output", str(tmp_path / "o"),
                                       "--codec-path", codec_dir, *common(tokenizer_path)]) == 0
    (doc,) = records(str(tmp_path / "o"))
    clip = load_audio(os.path.join(audio_dir, "clip.ogg"), 16000)
    np.testing.assert_array_equal(doc[-1].data, XCodec(codec_dir, device="cpu").encode([clip])[0])


@pytest.mark.parametrize("storage", ["pcm16", "mel"])
def test_understanding_round_trip(tmp_path, tokenizer_path, audio_dir, storage):
    recs = [{"sound": "wav2.wav", "conversations": [{"from": "human", "value": "Listen. <sound> What is it?"},
                                                     {"from": "gpt", "value": "a tone"}]},
            {"audio": "stereo.flac", "messages": [{"role": "user", "content": "describe"},
                                                  {"role": "assistant", "content": "hum"}]}]
    manifest = tmp_path / "u.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in recs))
    assert preprocess_understanding_main(["--input", str(manifest), "--output", str(tmp_path / "o"), "--audio-root",
                                          audio_dir, "--audio-in-storage", storage, "--n-mels", "16",
                                          "--window-seconds", "2", *common(tokenizer_path)]) == 0
    got = records(str(tmp_path / "o"))
    assert [(s.role, s.kind) for s in got[0]] == [("user", "text"), ("user", "audio_in"), ("user", "text"),
                                                 ("assistant", "text")]
    assert [(s.role, s.kind) for s in got[1]] == [("user", "audio_in"), ("user", "text"), ("assistant", "text")]
    wave = load_audio(os.path.join(audio_dir, "stereo.flac"), AUDIO_IN_SAMPLE_RATE)
    stored = got[1][0].data
    if storage == "pcm16":
        np.testing.assert_allclose(stored / 32767.0, wave, atol=1 / 32767)
    else:
        pcm = (np.clip(wave, -1, 1) * 32767.0).round().astype(np.int16)
        valid = LogMel(AudioInConfig(16, 2)).valid_windows(pcm_to_float(pcm))
        np.testing.assert_array_equal(stored, np.concatenate(valid, axis=1))
    assert got[1][0].units() == -(-wave.shape[0] // 640) == 63  # 2.5 s -> 62.5 -> 63 frames


BAD = [
    ("not json {", None, "not valid JSON"),
    (json.dumps({"audio": "missing.wav", "caption": "x"}), "audio", "does not exist"),
    (json.dumps({"audio": "corrupt.wav", "caption": "x"}), "audio", "cannot decode"),
    (json.dumps({"audio": "wav0.wav", "caption": "   "}), "caption", "empty text"),
    (json.dumps({"audio": "wav0.wav", "caption": 7}), "caption", "must be a string"),
    (json.dumps({"audio": "wav0.wav", "caption": "x", "start": 9.0}), "start", "past the end"),
    (json.dumps({"audio": "wav0.wav", "caption": "x", "start": 0.4, "end": 0.2}), "end", "must be after"),
    (json.dumps({"codes": [[1, 2, 3]] * 8, "caption": "x"}), None, None),  # valid precomputed codes
    (json.dumps({"codes": [[1, 2, 64]] * 8, "caption": "x"}), "codes", "must lie in [0, 64)"),
    (json.dumps({"codes": [[1, 2], [3]], "caption": "x"}), "codes", "K x T"),
    (json.dumps({"codes": [[1, 2, 3]] * 7, "caption": "x"}), "codes", "[K=8, T>0]"),
    (json.dumps({"audio": 3, "caption": "x"}), "audio", "must be a file path"),
]


def test_bad_records_are_skipped_with_reasons(tmp_path, tokenizer_path, codec_dir, audio_dir):
    import soundfile as sf

    sf.write(tmp_path / "tiny.wav", np.zeros(40, np.float32), 16000)  # 2.5 ms: no X-Codec frame
    bad = BAD + [(json.dumps({"audio": str(tmp_path / "tiny.wav"), "caption": "x"}), "audio", "too short")]
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(line for line, _, _ in bad) + "\n")
    out = tmp_path / "o"
    assert preprocess_generation_main(["--input", str(manifest), "--output", str(out), "--codec-path", codec_dir,
                                       "--audio-root", audio_dir, *common(tokenizer_path)]) == 0
    rejected = [json.loads(l) for l in open(out / "generation.rejected.jsonl")]
    expected = [(i + 1, field, text) for i, (_, field, text) in enumerate(bad) if text is not None]
    assert len(rejected) == len(expected)
    for r, (line, field, text) in zip(rejected, expected):
        assert r["source"] == f"{manifest}:{line}" and r["field"] == field and text in r["reason"], r
    meta = json.load(open(os.path.join(shards(str(out))[0], "shard.json")))
    assert meta["counts"]["samples"] == 1 and meta["counts"]["rejected"] == len(expected)
    assert meta["reject_reasons"]["audio: audio file <path> does not exist"] == 1


def test_understanding_bad_records(tmp_path, tokenizer_path, audio_dir):
    lines = [{"sound": "wav0.wav", "conversations": [{"from": "human", "value": "<sound> a <sound>"}]},
             {"sound": "wav0.wav", "conversations": [{"from": "robot", "value": "hi"}]},
             {"sound": "wav0.wav", "conversations": []},
             {"sound": "wav0.wav", "messages": [{"role": "assistant", "content": "no user turn"}]},
             {"conversations": [{"from": "human", "value": "<sound>"}]}]
    manifest = tmp_path / "u.jsonl"
    manifest.write_text("\n".join(json.dumps(l) for l in lines))
    out = tmp_path / "o"
    assert preprocess_understanding_main(["--input", str(manifest), "--output", str(out), "--audio-root", audio_dir,
                                          *common(tokenizer_path)]) == 1  # every record rejected
    rejected = [json.loads(l) for l in open(out / "understanding.rejected.jsonl")]
    assert [(r["source"].rsplit(":", 1)[1], r["field"]) for r in rejected] == [
        ("1", "conversations[0].value"), ("2", "conversations[0].from"), ("3", "conversations"),
        ("4", "messages[0].content"), ("5", "audio")]


def test_strict_stops_at_first_bad_record(tmp_path, tokenizer_path, capsys):
    manifest = tmp_path / "t.jsonl"
    manifest.write_text('{"text": "dog"}\n{"text": ""}\n{"text": "rain"}\n')
    out = tmp_path / "o"
    assert preprocess_text_main(["--input", str(manifest), "--output", str(out), "--strict", *common(tokenizer_path)]) == 1
    err = capsys.readouterr().err
    assert f"{manifest}:2" in err and "'text'" in err and "empty text" in err
    assert shards(str(out)) == [] and not glob.glob(str(out / ".*partial"))


def test_parquet_and_worker_count_do_not_change_output(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"dog {'rain ' * (i % 7)}bark {i}"} for i in range(300)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet", row_group_size=64)
    args = ["--input", str(tmp_path / "m.parquet"), "--records-per-shard", "70", *common(tokenizer_path)]
    assert preprocess_text_main([*args, "--output", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert preprocess_text_main([*args, "--output", str(tmp_path / "two"), "--workers", "2"]) == 0
    one, two = shards(str(tmp_path / "one")), shards(str(tmp_path / "two"))
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        for f in ("text.bin", "text.idx", "shard.json"):
            assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), (a, f)


def test_resume_keeps_finished_shards_and_rejects_other_settings(tmp_path, tokenizer_path, sentencepiece_path,
                                                                 capsys):
    manifest = tmp_path / "t.jsonl"
    manifest.write_text("".join(json.dumps({"text": f"dog bark {i}"}) + "\n" for i in range(50)))
    args = ["--input", str(manifest), "--output", str(tmp_path / "o"), "--records-per-shard", "20"]
    assert preprocess_text_main([*args, *common(tokenizer_path)]) == 0
    first = shards(str(tmp_path / "o"))
    stamps = [os.stat(os.path.join(s, "text.bin")).st_mtime_ns for s in first]
    assert preprocess_text_main([*args, *common(tokenizer_path)]) == 0
    assert [os.stat(os.path.join(s, "text.bin")).st_mtime_ns for s in first] == stamps
    capsys.readouterr()
    assert preprocess_text_main([*args, *common(sentencepiece_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds shards of another run" in err and "sp.model here" in err and "new --output" in err
    assert "\n" not in err


@pytest.mark.slow
def test_crash_mid_run_then_resume(tmp_path, tokenizer_path, codec_dir, audio_dir):
    """A worker blocks on a FIFO (an unfinished upload); the run is killed, fixed and resumed."""
    names = [f"wav{i % 6}.wav" for i in range(12)]
    names[9] = str(tmp_path / "stuck.wav")
    os.mkfifo(names[9])
    manifest = tmp_path / "g.jsonl"
    manifest.write_text("".join(json.dumps({"audio": n, "caption": f"tone {i}"}) + "\n" for i, n in enumerate(names)))
    out = tmp_path / "o"
    cmd = [sys.executable, os.path.join(REPO, "tools", "preprocess_generation.py"), "--input", str(manifest),
           "--output", str(out), "--records-per-shard", "4", "--workers", "2", "--codec-path", codec_dir,
           "--audio-root", audio_dir, "--codec-device", "cpu", *common(tokenizer_path)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(shards(str(out))) < 2:
            time.sleep(0.2)
        assert len(shards(str(out))) == 2, "the two unblocked shards should finish"
        assert glob.glob(str(out / ".generation-00002.partial"))  # the blocked shard, not under its name
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {s: os.stat(os.path.join(s, "codes.bin")).st_mtime_ns for s in shards(str(out))}
    os.remove(names[9])
    os.symlink(os.path.join(audio_dir, "wav3.wav"), names[9])
    resume = [*cmd[2:cmd.index("--workers")], *cmd[cmd.index("--workers") + 2:]]  # in-process, 1 worker
    assert preprocess_generation_main(resume) == 0
    assert len(shards(str(out))) == 3 and not glob.glob(str(out / ".*partial"))
    assert {s: os.stat(os.path.join(s, "codes.bin")).st_mtime_ns for s in list(done)} == done
    clean = tmp_path / "clean"
    assert preprocess_generation_main([c if c != str(out) else str(clean) for c in resume]) == 0
    for a, b in zip(shards(str(out)), shards(str(clean))):
        for f in ("text.bin", "text.idx", "codes.bin", "codes.idx"):
            assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), (a, f)


class FrameLevelCodec(Codec):
    """A small transparent codec: per 20 ms frame, the RMS of K sub-blocks on a card-level scale."""

    name = "frame-level"
    sample_rate, frame_rate, num_codebooks, codebook_size = 16000, 50, 8, 64

    def __init__(self, path, device=None, num_codebooks=None):
        self.path = path

    def num_frames(self, num_samples: int) -> int:
        return num_samples // 320

    def encode(self, clips):
        out = []
        for c in clips:
            T = self.num_frames(c.shape[0])
            rms = np.sqrt((c[: T * 320].reshape(T, 8, 40) ** 2).mean(-1))  # [T, K]
            out.append(np.minimum(rms * 200, 63).astype(np.int64).T)  # [K, T]
        return out


def test_plug_in_codec_by_module_path(tmp_path, tokenizer_path, audio_dir):
    manifest = tmp_path / "g.jsonl"
    manifest.write_text(json.dumps({"audio": "wav4.wav", "caption": "a tone"}) + "\n")
    assert preprocess_generation_main(["--input", str(manifest), "--output", str(tmp_path / "o"), "--audio-root",
                                       audio_dir, "--codec", f"{__name__}:FrameLevelCodec", "--codec-path", "unused",
                                       *common(tokenizer_path)]) == 0
    (doc,) = records(str(tmp_path / "o"))
    clip = load_audio(os.path.join(audio_dir, "wav4.wav"), 16000)
    np.testing.assert_array_equal(doc[-1].data, FrameLevelCodec("unused").encode([clip])[0])
    meta = json.load(open(os.path.join(shards(str(tmp_path / "o"))[0], "shard.json")))
    assert meta["codec"]["name"] == "frame-level" and doc[-1].data.shape == (8, clip.shape[0] // 320)
