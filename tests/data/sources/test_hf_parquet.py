"""Hugging Face Parquet (the ``datasets`` Audio struct layout, any column names) and WavCaps JSON
+ zip, read in place; and field mappings in the post-training tools."""

from __future__ import annotations

import json
import os
import runpy
import zipfile

import pytest

from corpora import (UNDERSTANDING, assert_same_shards, clip, common, data_files, encode, rejected,
                     understanding_record, write_jsonl)
from megatron_ualm.data.cli import preprocess_generation_main, preprocess_understanding_main
from megatron_ualm.data.sources import CorpusError
from megatron_ualm.data.sources.fields import build_field_map
from megatron_ualm.data.sources.parquet import HFParquetCorpus
from megatron_ualm.data.tasks import Task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# The tool's own entry point, wherever the package keeps it (issue 19 moves it into data/cli.py).
preprocess_preferences_main = runpy.run_path(os.path.join(REPO, "tools", "preprocess_preferences.py"))[
    "preprocess_preferences_main"]


def hub_parquet(root, rows_per_group: int = 3, n: int = 10) -> tuple[str, list[dict]]:
    """A Hub-style dump: ``audio`` as the ``datasets`` Audio struct {bytes, path}, captions in
    ``caption_text``, written in row groups of ``rows_per_group``; and the clips extracted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Audio().pa_type
    rows, samples = [], []
    for i in range(n):
        rate = 44100 if i % 4 == 3 else 16000
        data = encode(clip(0.3 + 0.05 * i, rate, seed=i, channels=2 if i % 4 == 3 else 1), rate,
                      "WAV" if i % 2 else "FLAC")
        name = f"clip{i}.{'wav' if i % 2 else 'flac'}"
        (root / name).write_bytes(data)
        caption = f"bird song water drip {i}"
        rows.append({"audiocap_id": i, "audio": {"bytes": data, "path": name}, "caption_text": caption})
        samples.append({"audio": str(root / name), "caption": caption})
    table = pa.Table.from_pylist(rows, schema=pa.schema([("audiocap_id", pa.int64()), ("audio", audio_type),
                                                         ("caption_text", pa.string())]))
    path = root / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=rows_per_group, use_dictionary=False, compression="none")
    return str(path), samples


def test_hub_parquet_equals_the_extracted_manifest(tmp_path, tokenizer_path, codec_dir):
    path, samples = hub_parquet(tmp_path)
    manifest = write_jsonl(tmp_path / "m.jsonl", samples)
    args = common(tokenizer_path, 6, "--codec-path", codec_dir)
    assert preprocess_generation_main(["--input", manifest, "--output", str(tmp_path / "ref"), *args]) == 0
    assert preprocess_generation_main(["--input", path, "--input-format", "hf-parquet", "--field",
                                       "caption=caption_text", "--output", str(tmp_path / "hub"), *args]) == 0
    # Row groups of 3 pack two per shard of 6: the manifest's shards of 6 records.
    assert_same_shards(tmp_path / "ref", tmp_path / "hub")


def test_row_groups_are_the_units_tasks_own(tmp_path, tokenizer_path):
    path, samples = hub_parquet(tmp_path, rows_per_group=4)
    corpus = HFParquetCorpus([path], build_field_map(["caption=caption_text"]), "understanding", str(tmp_path))
    layout = corpus.layout(3)  # groups of 4, 4, 2 rows: shards of 3 + 1, 3 + 1, 2
    assert [layout.size(k) for k in range(layout.num_shards)] == [3, 1, 3, 1, 2]
    rows = [[int(s.rsplit(" ", 1)[1]) for _, recs in corpus.read_shards(layout, layout.task_shards(Task(i, 2)))
             for s, _ in recs] for i in range(2)]
    assert rows == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]
    hub = ["--input", path, "--input-format", "hf-parquet", "--field", "answer=caption_text", "--field",
           'question="Describe the sound in detail."']
    args = [*hub, *common(tokenizer_path, 3, *UNDERSTANDING)]
    assert preprocess_understanding_main([*args, "--output", str(tmp_path / "one")]) == 0
    for i in (1, 0):
        assert preprocess_understanding_main([*args, "--output", str(tmp_path / "split"), "--num-tasks", "2",
                                              "--task-index", str(i)]) == 0
    assert_same_shards(tmp_path / "one", tmp_path / "split")
    # All ten rows in one shard: the manifest's single shard, byte for byte.
    manifest = write_jsonl(tmp_path / "m.jsonl", [understanding_record(s["audio"], s["caption"]) for s in samples])
    whole = common(tokenizer_path, 10, *UNDERSTANDING)
    assert preprocess_understanding_main(["--input", manifest, "--output", str(tmp_path / "ref"), *whole]) == 0
    assert preprocess_understanding_main([*hub, "--output", str(tmp_path / "whole"), *whole]) == 0
    assert_same_shards(tmp_path / "ref", tmp_path / "whole")


def wavcaps(root) -> tuple[str, str, list[dict]]:
    """WavCaps-style metadata ('id' with a .wav suffix, as in AudioSet_SL) and a zip of FLACs under
    a subfolder, some stored and some deflated; and the clips extracted."""
    entries, samples = [], []
    archive = root / "AudioSet_SL.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(7):
            data = encode(clip(0.4 + 0.05 * i, 32000, seed=i), 32000)
            name = f"Y{i:03d}abc"
            z.writestr(zipfile.ZipInfo(f"AudioSet_SL_flac/{name}.flac"), data,
                       compress_type=zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
            (root / f"{name}.flac").write_bytes(data)
            caption = f"thunder storm {i}"
            entries.append({"id": f"{name}.wav", "caption": caption, "audio": "wav_path", "duration": 0.4})
            samples.append({"audio": str(root / f"{name}.flac"), "caption": caption})
    entries.append({"id": "Ymissing.wav", "caption": "not in the zip", "audio": "wav_path", "duration": 1.0})
    meta = root / "as_final.json"
    meta.write_text(json.dumps({"num_captions_per_audio": 1, "data": entries}))
    return str(meta), str(archive), samples


def test_wavcaps_json_and_zip_equal_the_extracted_manifest(tmp_path, tokenizer_path):
    meta, archive, samples = wavcaps(tmp_path)
    manifest = write_jsonl(tmp_path / "m.jsonl", [understanding_record(s["audio"], s["caption"]) for s in samples])
    args = common(tokenizer_path, 4, *UNDERSTANDING)
    assert preprocess_understanding_main(["--input", manifest, "--output", str(tmp_path / "ref"), *args]) == 0
    out = tmp_path / "wavcaps"
    assert preprocess_understanding_main(["--input", meta, "--preset", "wavcaps", "--audio-root", archive,
                                          "--output", str(out), *args]) == 0
    bad = rejected(out, "understanding")
    assert [(r["source"], r["field"]) for r in bad] == [(f"{meta}:data[7] (id Ymissing.wav)", "audio")]
    assert "no audio file for 'Ymissing.wav'" in bad[0]["reason"]
    # The missing entry is the last shard's fourth record, which the manifest does not have: the
    # shards' data files are the same, their sidecars differ in that record only.
    for k in ("00000", "00001"):
        ours, ref = out / f"understanding-{k}", tmp_path / "ref" / f"understanding-{k}"
        assert data_files(ours) == data_files(ref)
        for f in data_files(ours):
            assert open(ours / f, "rb").read() == open(ref / f, "rb").read(), (k, f)
    assert json.load(open(out / "understanding-00001" / "shard.json"))["counts"]["samples"] == 3


def test_wavcaps_needs_its_audio(tmp_path, tokenizer_path, capsys):
    meta, archive, _ = wavcaps(tmp_path)
    base = ["--input", meta, "--preset", "wavcaps", "--output", str(tmp_path / "o"),
            *common(tokenizer_path, 4, *UNDERSTANDING)]
    assert preprocess_understanding_main(base) == 2
    assert "--input-format wavcaps needs --audio-root" in capsys.readouterr().err
    (tmp_path / "part.zip").write_bytes(b"PK\x07\x08 split archive part")
    (tmp_path / "part.z01").write_bytes(b"")
    assert preprocess_understanding_main([*base, "--audio-root", str(tmp_path / "part.zip")]) == 2
    assert "zip -s 0" in capsys.readouterr().err
    with pytest.raises(CorpusError, match="not a JSON file"):
        from megatron_ualm.data.sources.wavcaps import entries

        (tmp_path / "bad.json").write_text("{")
        entries(str(tmp_path / "bad.json"))


def test_preference_columns_mapped_in_the_post_training_tool(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"describe rain {i}", "better": f"rain on the roof {i}", "worse": f"dog {i}"}
            for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet", row_group_size=2)
    manifest = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["instruction"], "chosen": r["better"],
                                                      "rejected": r["worse"]} for r in rows])
    args = ["--tokenizer", tokenizer_path, "--no-progress", "--records-per-shard", "4"]
    assert preprocess_preferences_main(["--input", manifest, "--output", str(tmp_path / "ref"), *args]) == 0
    assert preprocess_preferences_main(["--input", str(tmp_path / "pairs.parquet"), "--field", "prompt=instruction",
                                        "--field", "chosen=better", "--field", "rejected=worse",
                                        "--output", str(tmp_path / "mapped"), *args]) == 0
    assert_same_shards(tmp_path / "ref", tmp_path / "mapped")


def test_wavcaps_audio_folder_lookup(tmp_path):
    from megatron_ualm.data.errors import RecordError
    from megatron_ualm.data.sources.wavcaps import AudioIndex

    for rel in ("FreeSound/180913.flac", "BBC/07019047.wav", "a/dup.flac", "b/dup.flac", "notes.txt"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    index = AudioIndex(str(tmp_path))
    assert index.find("FreeSound/180913.flac") == str(tmp_path / "FreeSound/180913.flac")  # by path
    assert index.find("07019047.wav") == str(tmp_path / "BBC/07019047.wav")  # by name
    assert index.find("180913") == str(tmp_path / "FreeSound/180913.flac")  # by stem
    with pytest.raises(RecordError, match="matches 2 files"):
        index.find("dup.wav")
    with pytest.raises(RecordError, match="no audio file for 'notes'"):
        index.find("notes")  # not an audio file
