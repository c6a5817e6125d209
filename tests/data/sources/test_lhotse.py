"""Lhotse corpora written by ``lhotse`` itself (``CutSet.to_file``, the Shar writer), read in
place: the same shards as a JSONL manifest over the clips, cuts named in rejections."""

from __future__ import annotations

import json
import os

import pytest
import soundfile as sf

from corpora import (UNDERSTANDING, assert_same_shards, clip, common, rejected, shard_dirs, understanding_record,
                     write_jsonl)
from megatron_ualm.data.cli import preprocess_generation_main, preprocess_understanding_main
from megatron_ualm.data.sources.tar import scan_tar

ASR_QUESTION = "Transcribe the speech."


def asr_cuts(root, n: int = 7):
    """``n`` MonoCuts of recordings on disk, each a 0.2 s .. 0.2 + d span with one supervision."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    recordings, supervisions = [], []
    for i in range(n):
        rate = 16000 if i % 3 else 22050
        path = root / f"utt{i}.wav"
        sf.write(path, clip(1.0 + 0.1 * i, rate, seed=i), rate)
        rec = Recording.from_file(str(path), recording_id=f"utt{i}")
        recordings.append(rec)
        supervisions.append(SupervisionSegment(id=f"utt{i}-0", recording_id=rec.id, start=0.0, duration=rec.duration,
                                               text=f"dog bark rain {i}"))
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                                 supervisions=SupervisionSet.from_segments(supervisions))
    return CutSet.from_cuts(c.truncate(offset=0.2, duration=0.4 + 0.05 * i).with_id(f"cut{i}")
                            for i, c in enumerate(cuts))


def test_cut_manifest_equals_the_manifest_of_its_spans(tmp_path, tokenizer_path, codec_dir):
    from lhotse import CutSet

    path = str(tmp_path / "cuts.jsonl.gz")
    asr_cuts(tmp_path).to_file(path)
    cuts = list(CutSet.from_file(path))
    spans = [dict(audio=c.recording.sources[0].source, start=c.start, end=c.start + c.duration) for c in cuts]
    texts = [c.supervisions[0].text for c in cuts]

    und = write_jsonl(tmp_path / "und.jsonl", [understanding_record(s.pop("audio"), t, ASR_QUESTION, **s)
                                               for s, t in zip([dict(x) for x in spans], texts)])
    args = common(tokenizer_path, 3, *UNDERSTANDING)
    assert preprocess_understanding_main(["--input", und, "--output", str(tmp_path / "und_ref"), *args]) == 0
    for qa in (["--field", f"question=\"{ASR_QUESTION}\"", "--field", "answer=supervisions[0].text"],
               ["--preset", "lhotse-asr"]):
        qa_out = tmp_path / f"und_{len(qa)}"
        assert preprocess_understanding_main(["--input", path, *qa, "--output", str(qa_out), *args]) == 0
        assert_same_shards(tmp_path / "und_ref", qa_out)
    meta = json.load(open(os.path.join(shard_dirs(tmp_path / "und_2")[0], "shard.json")))
    assert meta["source"]["format"] == "lhotse"  # detected from the file's cuts

    gen = write_jsonl(tmp_path / "gen.jsonl", [{**s, "caption": t} for s, t in zip(spans, texts)])
    args = common(tokenizer_path, 4, "--codec-path", codec_dir)
    assert preprocess_generation_main(["--input", gen, "--output", str(tmp_path / "gen_ref"), *args]) == 0
    # The transcript is the generation caption without any mapping (TTS).
    assert preprocess_generation_main(["--input", path, "--output", str(tmp_path / "gen"), *args]) == 0
    assert_same_shards(tmp_path / "gen_ref", tmp_path / "gen")


def test_cuts_this_reader_cannot_reproduce_are_named(tmp_path, tokenizer_path):
    from lhotse import AudioSource, CutSet, MonoCut, Recording
    from lhotse.utils import fastcopy

    cuts = list(asr_cuts(tmp_path, 3))
    mixed = cuts[1].mix(cuts[2]).with_id("mixed")
    remote = fastcopy(cuts[2], id="remote", recording=Recording(
        id="remote", sources=[AudioSource("url", [0], "https://x/y.wav")], sampling_rate=16000, num_samples=32000,
        duration=2.0))
    sf.write(tmp_path / "stereo.wav", clip(1.0, 16000, channels=2), 16000)
    stereo = Recording.from_file(str(tmp_path / "stereo.wav"), recording_id="stereo")
    left = MonoCut(id="left", start=0.0, duration=1.0, channel=0, recording=stereo)
    fast = cuts[0].perturb_speed(1.1).with_id("fast")
    lost = cuts[1].with_id("lost")
    os.remove(lost.recording.sources[0].source)
    path = str(tmp_path / "cuts.jsonl.gz")
    CutSet.from_cuts([cuts[0], mixed, remote, lost, left, fast, cuts[2]]).to_file(path)
    out = tmp_path / "out"
    assert preprocess_understanding_main(["--input", path, "--preset", "lhotse-asr", "--output", str(out),
                                          *common(tokenizer_path, 10, *UNDERSTANDING)]) == 0
    got = {r["source"]: (r["field"], r["reason"]) for r in rejected(out, "understanding")}
    assert set(got) == {f"{path}:2 (cut mixed)", f"{path}:3 (cut remote)", f"{path}:4 (cut lost)",
                        f"{path}:5 (cut left)", f"{path}:6 (cut fast)"}
    assert got[f"{path}:5 (cut left)"][0] == "channel" and "of a 2-channel recording" in got[f"{path}:5 (cut left)"][1]
    assert got[f"{path}:6 (cut fast)"][0] == "recording.transforms" and "Speed" in got[f"{path}:6 (cut fast)"][1]
    assert got[f"{path}:2 (cut mixed)"][0] == "type" and "MixedCut" in got[f"{path}:2 (cut mixed)"][1]
    assert got[f"{path}:3 (cut remote)"] == ("recording.sources", "has a 'url' audio source; give local files "
                                             "('file' sources) or Lhotse Shar")
    assert got[f"{path}:4 (cut lost)"][0] == "audio" and "does not exist" in got[f"{path}:4 (cut lost)"][1]


@pytest.fixture
def shar(tmp_path):
    """A Shar directory (3 cuts per shard) written by lhotse, and its audio extracted to files
    with each cut's transcript."""
    from lhotse import CutSet

    directory = tmp_path / "shar"
    directory.mkdir()
    asr_cuts(tmp_path).to_shar(str(directory), fields={"recording": "flac"}, shard_size=3)
    texts = {c.id: c.supervisions[0].text for c in CutSet.from_shar(in_dir=str(directory))}
    extracted = []
    for k in range(3):
        tar = str(directory / f"recording.{k:06d}.tar")
        for member in scan_tar(tar).members:
            if member.name.endswith(".flac"):
                with open(tar, "rb") as f:
                    f.seek(member.offset)
                    (tmp_path / member.name).write_bytes(f.read(member.size))
                extracted.append((str(tmp_path / member.name), texts[member.name[:-5]]))
    return str(directory), extracted


def test_shar_equals_the_manifest_of_its_extracted_audio(tmp_path, tokenizer_path, shar):
    directory, extracted = shar
    manifest = write_jsonl(tmp_path / "m.jsonl", [understanding_record(a, t, ASR_QUESTION) for a, t in extracted])
    args = common(tokenizer_path, 3, *UNDERSTANDING)
    assert preprocess_understanding_main(["--input", manifest, "--output", str(tmp_path / "ref"), *args]) == 0
    assert preprocess_understanding_main(["--input", directory, "--preset", "lhotse-asr",
                                          "--output", str(tmp_path / "one"), *args]) == 0
    assert_same_shards(tmp_path / "ref", tmp_path / "one")
    # Two tasks each read their own Shar shards (0 and 2, and 1); together they are the one-task run.
    for i in (0, 1):
        assert preprocess_understanding_main(["--input", directory, "--preset", "lhotse-asr", "--num-tasks", "2",
                                              "--task-index", str(i), "--output", str(tmp_path / "split"), *args]) == 0
    assert_same_shards(tmp_path / "one", tmp_path / "split")


def test_a_truncated_shar_archive_keeps_the_cuts_before_it(tmp_path, tokenizer_path, shar):
    directory, _ = shar
    tar = os.path.join(directory, "recording.000001.tar")
    members = scan_tar(tar).members
    data = open(tar, "rb").read()
    open(tar, "wb").write(data[:members[2].offset + 100])  # inside the second cut's audio
    out = tmp_path / "out"
    assert preprocess_understanding_main(["--input", directory, "--preset", "lhotse-asr", "--output", str(out),
                                          *common(tokenizer_path, 3, *UNDERSTANDING)]) == 0
    bad = rejected(out, "understanding")
    cuts = os.path.join(directory, "cuts.000001.jsonl.gz")
    assert [r["source"] for r in bad] == [f"{cuts}:2 (cut cut4)", f"{cuts}:3 (cut cut5)"]
    assert "is cut short" in bad[0]["reason"] and "truncated" in bad[1]["reason"]
    summary = json.load(open(out / "understanding.task-00000-of-00001.json"))
    assert summary["counts"]["samples"] == 5
