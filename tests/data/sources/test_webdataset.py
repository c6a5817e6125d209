"""WebDataset tars written by ``webdataset.TarWriter``, read in place by the preprocessing tools:
the same shards as a JSONL manifest over the extracted files, tasks that own whole tars, and
bad samples named by archive and key."""

from __future__ import annotations

import json
import os

import pytest

from corpora import (QUESTION, UNDERSTANDING, assert_same_shards, clip, common, encode, rejected, shard_dirs,
                     understanding_record, write_jsonl)
from megatron_ualm.data.cli import preprocess_generation_main, preprocess_understanding_main
from megatron_ualm.data.sources import CorpusError, expand_inputs
from megatron_ualm.data.sources.fields import build_field_map
from megatron_ualm.data.sources.tar import WebDatasetCorpus, scan_tar
from megatron_ualm.data.tasks import Task, problems

SIZES = (4, 4, 6)  # samples per tar


def write_laion(root, sizes=SIZES) -> tuple[str, list[dict]]:
    """LAION-Audio-630K-like tars (key.flac + key.json with a 'text' list) and the same samples
    extracted to files, as (tar pattern, [{"audio": path, "caption": text}, ...])."""
    import webdataset as wds

    os.makedirs(root / "tars", exist_ok=True)
    os.makedirs(root / "files", exist_ok=True)
    samples = []
    for t, n in enumerate(sizes):
        with wds.TarWriter(str(root / "tars" / f"laion-{t:06d}.tar")) as sink:
            for i in range(n):
                key = f"{t:02d}{i:04d}"
                rate = 22050 if i % 3 == 2 else 16000
                data = encode(clip(0.3 + 0.1 * i, rate, seed=t * 10 + i), rate)
                caption = f"dog bark rain {t} {i}" + " wind" * (i % 2)
                sink.write({"__key__": key, "flac": data,
                            "json": {"text": [caption, "an alternative caption"], "original_data": {"id": key}}})
                path = root / "files" / f"{key}.flac"
                path.write_bytes(data)
                samples.append({"audio": str(path), "caption": caption})
    return str(root / "tars" / f"laion-{{000000..{len(sizes) - 1:06d}}}.tar"), samples


@pytest.fixture
def laion(tmp_path):
    return write_laion(tmp_path)


def test_understanding_from_tars_equals_the_extracted_manifest(tmp_path, tokenizer_path, laion):
    pattern, samples = laion
    manifest = write_jsonl(tmp_path / "m.jsonl", [understanding_record(s["audio"], s["caption"]) for s in samples])
    args = common(tokenizer_path, 8, *UNDERSTANDING)
    assert preprocess_understanding_main(["--input", manifest, "--output", str(tmp_path / "ref"), *args]) == 0
    assert preprocess_understanding_main(["--input", pattern, "--preset", "laion-audio-630k",
                                          "--output", str(tmp_path / "tar"), *args]) == 0
    # Tars of 4 + 4 samples share the first shard, the 6-sample tar is the second: the manifest's layout.
    assert_same_shards(tmp_path / "ref", tmp_path / "tar")
    meta = json.load(open(os.path.join(shard_dirs(tmp_path / "tar")[0], "shard.json")))
    assert meta["source"]["format"] == "webdataset" and meta["source"]["manifests"] == [os.path.abspath(pattern)]


def test_generation_from_tars_equals_the_extracted_manifest(tmp_path, tokenizer_path, codec_dir, laion):
    pattern, samples = laion
    manifest = write_jsonl(tmp_path / "m.jsonl", samples)
    args = common(tokenizer_path, 8, "--codec-path", codec_dir)
    assert preprocess_generation_main(["--input", manifest, "--output", str(tmp_path / "ref"), *args]) == 0
    # An explicit mapping instead of the preset, and the workers path: the same bytes.
    assert preprocess_generation_main(["--input", pattern, "--field", "caption=json.text[0]", "--workers", "2",
                                       "--output", str(tmp_path / "tar"), *args]) == 0
    assert_same_shards(tmp_path / "ref", tmp_path / "tar")
    # Workers that only read and decode, the codec in this process (the GPU layout): the same bytes.
    assert preprocess_generation_main(["--input", pattern, "--preset", "laion-audio-630k", "--workers", "2",
                                       "--encode-in-main", "--output", str(tmp_path / "main"), *args]) == 0
    assert_same_shards(tmp_path / "ref", tmp_path / "main")


def test_tasks_own_whole_tars_and_their_union_is_one_run(tmp_path, tokenizer_path, laion):
    pattern, _ = laion
    args = ["--input", pattern, "--preset", "laion-audio-630k", *common(tokenizer_path, 4, *UNDERSTANDING)]
    assert preprocess_understanding_main([*args, "--output", str(tmp_path / "one")]) == 0
    split = tmp_path / "split"
    assert preprocess_understanding_main([*args, "--output", str(split), "--num-tasks", "2", "--task-index", "1"]) == 0
    assert "task 0: 0 of 3 shards written" in problems(str(split), "understanding")[0]
    assert preprocess_understanding_main([*args, "--output", str(split), "--num-tasks", "2", "--task-index", "0"]) == 0
    assert problems(str(split), "understanding") == []
    assert_same_shards(tmp_path / "one", split)
    run = json.load(open(split / "understanding.run.json"))
    # The 6-sample tar is cut into shards 2 and 3, one group: both belong to task 0.
    assert run["num_shards"] == 4 and run["group_starts"] == [0, 1, 2]
    assert json.load(open(split / "understanding.task-00000-of-00002.json"))["shards"] == [
        "understanding-00000", "understanding-00002", "understanding-00003"]

    # Each task reads only its own tars.
    corpus = WebDatasetCorpus([pattern], build_field_map(preset="laion-audio-630k", family="understanding"),
                              "understanding", str(tmp_path))
    layout = corpus.layout(4)
    archives = []
    for i in range(2):
        sources = [s for _, recs in corpus.read_shards(layout, layout.task_shards(Task(i, 2))) for s, _ in recs]
        archives.append({s.rsplit(":", 1)[0] for s in sources})
    assert archives == [{expand_inputs([pattern])[0], expand_inputs([pattern])[2]}, {expand_inputs([pattern])[1]}]

    # A rerun of task 0 after losing one shard rewrites only that one, with the same bytes.
    lost = split / "understanding-00003"
    kept = os.stat(split / "understanding-00000" / "text.bin").st_mtime_ns
    for f in os.listdir(lost):
        os.remove(lost / f)
    os.rmdir(lost)
    os.remove(split / "understanding.task-00000-of-00002.json")
    assert preprocess_understanding_main([*args, "--output", str(split), "--num-tasks", "2", "--task-index", "0"]) == 0
    assert os.stat(split / "understanding-00000" / "text.bin").st_mtime_ns == kept
    assert_same_shards(tmp_path / "one", split)


def bad_corpus(root) -> tuple[str, str]:
    """A good tar, then one with a sample lacking audio, one lacking json, undecodable audio and
    a json without captions, then a copy of the good tar truncated inside its last member."""
    import webdataset as wds

    good = str(root / "a-good.tar")
    with wds.TarWriter(good) as sink:
        for i in range(3):
            sink.write({"__key__": f"g{i}", "flac": encode(clip(0.4, seed=i)), "json": {"text": [f"dog bark {i}"]}})
    bad = str(root / "b-bad.tar")
    with wds.TarWriter(bad) as sink:
        sink.write({"__key__": "noaudio", "json": {"text": ["rain"]}})
        sink.write({"__key__": "nojson", "flac": encode(clip(0.4))})
        sink.write({"__key__": "garbage", "flac": b"not a flac file at all" * 20, "json": {"text": ["wind"]}})
        sink.write({"__key__": "nocaption", "flac": encode(clip(0.4)), "json": {"title": "untitled"}})
        sink.write({"__key__": "fine", "flac": encode(clip(0.5, seed=7)), "json": {"text": "a single caption"}})
    data = open(good, "rb").read()
    members = scan_tar(good).members
    cut = members[-2].offset + members[-2].size // 2  # inside g2.flac (the last sample's audio)
    truncated = str(root / "c-truncated.tar")
    open(truncated, "wb").write(data[:cut])
    return str(root / "*.tar"), truncated


def test_bad_samples_are_named_and_good_ones_kept(tmp_path, tokenizer_path):
    pattern, truncated = bad_corpus(tmp_path)
    out = tmp_path / "out"
    assert preprocess_understanding_main(["--input", pattern, "--preset", "laion-audio-630k", "--output", str(out),
                                          *common(tokenizer_path, 100, *UNDERSTANDING)]) == 0
    summary = json.load(open(out / "understanding.task-00000-of-00001.json"))
    # Kept: g0..g2, fine, and g0, g1 of the truncated copy (before the damage).
    assert summary["counts"]["samples"] == 6
    got = {r["source"].replace(str(tmp_path) + "/", ""): (r["field"], r["reason"]) for r in rejected(out, "understanding")}
    assert set(got) == {"b-bad.tar:noaudio", "b-bad.tar:nojson", "b-bad.tar:garbage", "b-bad.tar:nocaption",
                        "c-truncated.tar:g2", "c-truncated.tar:<after g2>"}
    assert got["b-bad.tar:noaudio"][0] == "audio" and "has no audio" in got["b-bad.tar:noaudio"][1]
    field, reason = got["b-bad.tar:nojson"]
    assert field == "answer" and "json.text[0]|json.text finds nothing" in reason and "flac (" in reason
    field, reason = got["b-bad.tar:garbage"]
    assert field == "audio" and f"cannot decode audio {tmp_path}/b-bad.tar:garbage.flac" in reason
    assert "object at 0x" not in reason  # libsndfile's reason, not the repr of the bytes it read
    field, reason = got["b-bad.tar:nocaption"]
    assert field == "answer" and "its fields are: __key__, flac (" in reason and "json.title" in reason
    assert "g2.flac is cut short" in got["c-truncated.tar:g2"][1]
    assert "is truncated" in got["c-truncated.tar:<after g2>"][1]


def test_strict_stops_at_the_first_bad_sample(tmp_path, tokenizer_path, capsys):
    pattern, _ = bad_corpus(tmp_path)
    rc = preprocess_understanding_main(["--input", pattern, "--preset", "laion-audio-630k", "--strict",
                                        "--output", str(tmp_path / "out"), *common(tokenizer_path, 100, *UNDERSTANDING)])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"error (--strict): {tmp_path}/b-bad.tar:noaudio: field 'audio'" in err


@pytest.mark.parametrize("flags, message", [
    (["answer=json.caption", f'question="{QUESTION}"'], "the mapping answer=json.caption finds nothing"),
    # Nothing maps the answer and the sample has none under the record's names.
    ([], "no --field maps the answer (or conversation)"),
    # json.text is LAION's list of captions: one is the answer.
    (["answer=json.text", f'question="{QUESTION}"'], "the mapping answer=json.text finds a list of"),
    (["answer=json.text[0]"], "no question is given: add the question asked about every clip"),
])
def test_a_mapping_that_cannot_work_stops_before_the_run(tmp_path, tokenizer_path, laion, capsys, flags, message):
    pattern, _ = laion
    rc = preprocess_understanding_main(["--input", pattern, *(a for f in flags for a in ("--field", f)),
                                        "--output", str(tmp_path / "out"), *common(tokenizer_path, 8, *UNDERSTANDING)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "laion-000000.tar:000000: " in err and message in err
    if "finds a list" in message:
        assert "take an item, e.g. json.text[0]" in err
    if "finds nothing" in message or "no --field" in message:
        assert "its fields are: __key__, flac (" in err and "json.text, json.original_data.id" in err
    assert not os.path.exists(tmp_path / "out")


def test_counting_reads_headers_only(tmp_path):
    import webdataset as wds

    # Audio that no decoder reads: counting must not try.
    path = str(tmp_path / "x.tar")
    with wds.TarWriter(path) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "flac": os.urandom(3000), "json": {"text": ["x"]}})
    corpus = WebDatasetCorpus([path], build_field_map(), "understanding", str(tmp_path))
    assert [u.records for u in corpus.units()] == [5]
    # A file cut exactly between two samples lacks the end-of-archive marker; one cut inside a
    # header loses that member: either way the scan says so, and the problem is one more record.
    members = scan_tar(path).members
    boundary = members[3].offset + 512  # k1.json's data (15 bytes) padded to a block
    for end, what in ((boundary, "without the end-of-archive marker"), (boundary + 100, "inside the header at byte")):
        cut = str(tmp_path / "cut.tar")
        open(cut, "wb").write(open(path, "rb").read()[:end])
        scan = scan_tar(cut)
        assert len(scan.members) == 4 and what in scan.problem
        assert [u.records for u in WebDatasetCorpus([cut], build_field_map(), "understanding", ".").units()] == [3]


def test_inputs_that_cannot_be_read_in_place(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(CorpusError, match="gunzip"):
        WebDatasetCorpus([str(tmp_path / "a.tar.gz")], build_field_map(), "understanding", ".")
    (tmp_path / "x-000001.tar").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"x-000002\.tar does not exist \(expanded from the brace range\)"):
        expand_inputs([str(tmp_path / "x-{000001..000002}.tar")])
    with pytest.raises(CorpusError, match="matches no file"):
        expand_inputs([str(tmp_path / "none-*.tar")])


def test_the_default_record_is_the_json_plus_the_audio_member(tmp_path):
    import webdataset as wds

    from megatron_ualm.data.sources import materialize

    path = str(tmp_path / "x.tar")
    with wds.TarWriter(path) as sink:
        sink.write({"__key__": "a", "wav": b"RIFF", "json": {"caption": "rain", "start": 0.5}, "txt": "a note"})
        sink.write({"__key__": "b", "flac": b"fLaC", "wav": b"RIFF", "json": {"caption": "two clips"}})
        sink.write({"__key__": "c", "flac": b"fLaC"})
        sink.write({"__key__": "d", "flac": b"fLaC", "json": b"{not json"})
    corpus = WebDatasetCorpus([path], build_field_map(), "generation", str(tmp_path))
    layout = corpus.layout(10)
    got = dict(materialize([r for _, recs in corpus.read_shards(layout, [0]) for r in recs]))
    a = got[f"{path}:a"]
    assert (a["caption"], a["start"], bytes(a["audio"]), a["audio"].name) == ("rain", 0.5, b"RIFF", f"{path}:a.wav")
    assert "several audio members" in got[f"{path}:b"].reason and "--field audio=" in got[f"{path}:b"].reason
    assert got[f"{path}:c"].field == "json" and "has no .json member (its members: c.flac)" in got[f"{path}:c"].reason
    assert got[f"{path}:d"].field == "json" and "d.json is not valid JSON" in got[f"{path}:d"].reason
    # With a mapping, other members serve: the text member as the caption, one of two clips as the audio.
    corpus = WebDatasetCorpus([path], build_field_map(["caption=txt|json.caption", "audio=flac|wav"]), "generation",
                              str(tmp_path))
    got = dict(materialize([r for _, recs in corpus.read_shards(layout, [0]) for r in recs]))
    assert got[f"{path}:a"]["caption"] == "a note" and got[f"{path}:b"]["audio"].name == f"{path}:b.flac"
