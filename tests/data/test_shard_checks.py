"""Shards checked where they are used: sizes and counts, vocabulary layouts, blend files, paths."""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pytest

from megatron_ualm.data.blend import BlendPlan, build_datasets, check_shards, find_shards, load_plan, plan_blend
from megatron_ualm.data.cli import build_blend_main, inspect_shards_main, preprocess_text_main
from megatron_ualm.data.shards import SIDECAR, ShardError, ShardReader, read_sidecar
from megatron_ualm.data.tokenizer import TextTokenizer
from megatron_ualm.vocab import VocabMismatch, layout_fingerprint, vocab_layout


def shard_dirs(out: str) -> list[str]:
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(out, "*-[0-9]*", SIDECAR)))


def copy_shard(out: str, tmp_path, index: int = 0) -> str:
    src = shard_dirs(out)[index]
    dst = str(tmp_path / os.path.basename(os.path.dirname(src)) / os.path.basename(src))
    shutil.copytree(src, dst)
    return dst


def edit_sidecar(shard: str, edit) -> None:
    path = os.path.join(shard, SIDECAR)
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def truncate(path: str, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - nbytes)


def dataset_config(vocab):
    from megatron_ualm.data.audio import AudioInConfig

    return dict(random_seed=1, sequence_length=128, split="100,0,0", vocab=vocab, audio_in=AudioInConfig(16, 2),
                path_to_cache=None)


# -- vocabulary layout --------------------------------------------------------------------------


def test_sidecars_carry_the_vocab_layout_and_the_plan_keeps_it(corpus, tokenizer_path, tmp_path):
    tok = TextTokenizer(tokenizer_path).identity()
    gen = read_sidecar(shard_dirs(corpus["generation"])[0])
    assert gen["vocab"] == vocab_layout(tok, None, 8, 64)
    assert gen["vocab_fingerprint"] == layout_fingerprint(gen["vocab"])
    assert read_sidecar(shard_dirs(corpus["text"])[0])["vocab"] == vocab_layout(tok, None, None, None)

    plan = plan_blend(find_shards([corpus["text"], corpus["generation"]]))
    assert plan.vocab_layout == vocab_layout(tok, None, 8, 64)  # the tokenizer, K and card the shards share
    path = tmp_path / "blend.json"
    path.write_text(json.dumps(plan.to_json()))
    assert load_plan(str(path)).vocab_layout == plan.vocab_layout
    assert json.loads(path.read_text())["vocab_fingerprint"] == layout_fingerprint(plan.vocab_layout)


def test_blend_refuses_shards_with_different_layouts_naming_both(corpus, tmp_path):
    good = shard_dirs(corpus["generation"])[0]
    other = copy_shard(corpus["generation"], tmp_path, 1)
    edit_sidecar(other, lambda m: m["vocab"].update(special_tokens=["<|eos|>", "<|bos|>"]))
    with pytest.raises(VocabMismatch) as err:
        plan_blend([good, other])
    assert good in str(err.value) and other in str(err.value) and "special-token order" in str(err.value)


def test_old_sidecars_without_a_layout_get_one_from_their_fields(corpus, tmp_path):
    old = copy_shard(corpus["generation"], tmp_path)
    edit_sidecar(old, lambda m: (m.pop("vocab"), m.pop("vocab_fingerprint")))
    plan = plan_blend([old, shard_dirs(corpus["text"])[0]])
    assert plan.vocab_layout == read_sidecar(shard_dirs(corpus["generation"])[0])["vocab"]
    # An old blend file (no layout stored) reads its layout from the shards' sidecars.
    blob = plan.to_json()
    del blob["vocab"], blob["vocab_fingerprint"]
    (tmp_path / "old.json").write_text(json.dumps(blob))
    assert load_plan(str(tmp_path / "old.json")).vocab_layout == plan.vocab_layout


# -- sizes and counts ---------------------------------------------------------------------------


def test_truncated_bin_is_named_by_build_blend_check_shards_and_the_dataset(corpus, tmp_path, vocab, capsys):
    shard = copy_shard(corpus["generation"], tmp_path)
    plan = plan_blend([shard])
    truncate(os.path.join(shard, "codes.bin"), 6)
    bin_path = os.path.join(shard, "codes.bin")
    with pytest.raises(ShardError, match="codes.bin: .* bytes, the index describes"):
        plan_blend([shard])
    assert build_blend_main([shard, "--output", str(tmp_path / "b.json")]) == 1
    assert bin_path in capsys.readouterr().err
    with pytest.raises(ShardError, match=bin_path):
        check_shards(plan)
    with pytest.raises(ShardError, match=bin_path):
        build_datasets(plan, dataset_config(vocab), [10, None, None])
    with pytest.raises(ShardError, match=bin_path):
        ShardReader(shard)


def test_missing_or_unreadable_index_is_named(corpus, tmp_path):
    shard = copy_shard(corpus["text"], tmp_path)
    truncate(os.path.join(shard, "text.idx"), 40)
    with pytest.raises(ShardError, match="text.idx: unreadable index"):
        plan_blend([shard])
    os.remove(os.path.join(shard, "text.idx"))
    with pytest.raises(ShardError, match="text.idx is missing"):
        ShardReader(shard)


@pytest.mark.parametrize("key,delta", [("tokens", 100), ("samples", -1), ("text_tokens", 3)])
def test_sidecar_counts_must_match_the_index(corpus, tmp_path, key, delta):
    shard = copy_shard(corpus["text"], tmp_path)
    edit_sidecar(shard, lambda m: m["counts"].update({key: m["counts"][key] + delta}))
    with pytest.raises(ShardError, match=f"{SIDECAR}: counts.{key} = "):
        plan_blend([shard])


def test_check_shards_finds_a_stale_blend_and_reports_every_damaged_shard(corpus, tmp_path):
    shards = [copy_shard(corpus["text"], tmp_path, i) for i in range(3)]
    plan = plan_blend(shards)
    check_shards(plan)  # intact: no error
    stale = BlendPlan(plan.shards, plan.families, plan.samples, [t + 1 for t in plan.tokens], plan.upsample,
                      plan.vocab_layout)
    with pytest.raises(ShardError, match="rerun tools/build_blend.py"):
        check_shards(stale)
    truncate(os.path.join(shards[0], "text.bin"), 4)
    truncate(os.path.join(shards[2], "text.bin"), 4)
    with pytest.raises(ShardError) as err:
        check_shards(plan)
    assert "2 of 3 shards" in str(err.value) and len(err.value.problems) == 2
    assert "\n" not in str(err.value)


def test_load_plan_gives_one_line_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="build_blend"):
        load_plan(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad}: not a blend file: invalid JSON"):
        load_plan(str(bad))
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a UALM blend file"):
        load_plan(str(bad))
    plan = plan_blend(find_shards([corpus["text"]]))
    blob = plan.to_json()
    del blob["shards"][1]["tokens"]
    bad.write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=r"shards\[1\]\.tokens"):
        load_plan(str(bad))
    blob = plan.to_json()
    blob["shards"][0]["family"] = "speech"
    bad.write_text(json.dumps(blob))
    with pytest.raises(ValueError, match=r"shards\[0\]\.family"):
        load_plan(str(bad))


# -- recorded paths -------------------------------------------------------------------------------


def test_sidecar_paths_resolve_from_any_working_directory(tmp_path, monkeypatch, tokenizer_path, capsys):
    project = tmp_path / "project"
    (project / "tok").mkdir(parents=True)
    shutil.copy(tokenizer_path, project / "tok" / "tokenizer.json")
    (project / "t.jsonl").write_text("".join(json.dumps({"text": f"dog bark rain {i}"}) + "\n" for i in range(4)))
    monkeypatch.chdir(project)
    assert preprocess_text_main(["--input", "t.jsonl", "--output", "shards/text", "--tokenizer",
                                 "tok/tokenizer.json", "--no-progress"]) == 0
    shard = shard_dirs(str(project / "shards" / "text"))[0]
    with open(os.path.join(shard, SIDECAR)) as f:
        assert json.load(f)["tokenizer"]["path"] == str(project / "tok" / "tokenizer.json")  # stored absolute

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert inspect_shards_main([shard, "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "[assistant] '" in out and "ids [" not in out  # decoded with the recorded tokenizer

    # A shard written before paths were stored absolute: relative to the directory preprocessing ran in.
    edit_sidecar(shard, lambda m: m["tokenizer"].update(path="tok/tokenizer.json"))
    assert read_sidecar(shard)["tokenizer"]["path"] == str(project / "tok" / "tokenizer.json")
    assert ShardReader(shard).meta["tokenizer"]["path"] == str(project / "tok" / "tokenizer.json")
    assert inspect_shards_main([shard, "--show", "1"]) == 0
    assert "ids [" not in capsys.readouterr().out
