"""The blended sampler: weights from token counts, realised proportions, determinism, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_ualm.data.audio import AudioInConfig
from megatron_ualm.data.blend import build_data_loader, build_datasets, find_shards, load_plan, plan_blend
from megatron_ualm.data.cli import build_blend_main

SEQ = 128


@pytest.fixture(scope="module")
def plan(corpus):
    return plan_blend(find_shards([corpus["text"], corpus["generation"], corpus["understanding"]]))


def config(vocab, seed=5, cache=None):
    return dict(random_seed=seed, sequence_length=SEQ, split="100,0,0", vocab=vocab,
                audio_in=AudioInConfig(16, 2), path_to_cache=cache)


def test_weights_are_tokens_times_upsampling(plan):
    tokens = {f: sum(t for t, g in zip(plan.tokens, plan.families) if g == f) for f in set(plan.families)}
    scaled = {f: tokens[f] * (2.0 if f == "generation" else 1.0) for f in tokens}
    for row in plan.family_table():
        assert row["share"] == pytest.approx(scaled[row["family"]] / sum(scaled.values()))
    text = [w for w, f in zip(plan.weights, plan.families) if f == "text"]
    text_tokens = [t for t, f in zip(plan.tokens, plan.families) if f == "text"]
    assert np.allclose(np.array(text) / sum(text), np.array(text_tokens) / sum(text_tokens))


def family_of(plan):
    return {family: [i for i, f in enumerate(plan.families) if f == family] for family in set(plan.families)}


def test_every_drawn_row_comes_from_its_shard(plan, vocab):
    train, _, _ = build_datasets(plan, config(vocab), [2000, None, None])
    index = np.asarray(train.dataset_index)
    assert sorted(np.unique(index)) == list(range(len(plan.shards)))
    for i in range(0, 2000, 197):
        item = train[i]
        family = plan.families[int(item["dataset_id"])]
        has_audio_out = bool((item["tokens"] == vocab.audio_out).any())
        assert has_audio_out == (family == "generation")


@pytest.fixture(scope="module")
def sparse_generation(tmp_path_factory, tokenizer_path):
    """Generation shards of precomputed codes whose records fill about 2/3 of a 100-position row."""
    from megatron_ualm.data.cli import preprocess_generation_main

    out = tmp_path_factory.mktemp("sparse")
    rng = np.random.default_rng(0)
    with open(out / "g.jsonl", "w") as f:
        for i in range(60):
            frames = int(rng.integers(40, 60))
            f.write(json.dumps({"caption": "dog bark rain", "codes": rng.integers(0, 64, (8, frames)).tolist()}) + "\n")
    assert preprocess_generation_main(["--input", str(out / "g.jsonl"), "--output", str(out / "gen"), "--codec",
                                       "precomputed", "--num-codebooks", "8", "--codebook-size", "64", "--frame-rate",
                                       "50", "--records-per-shard", "20", "--tokenizer", tokenizer_path,
                                       "--no-progress"]) == 0
    return str(out / "gen")


def test_realised_token_shares_follow_the_plan(corpus, sparse_generation, vocab):
    """Generation rows here are 2/3 full, text rows nearly full: tokens, not rows, follow the plan."""
    plan = plan_blend(find_shards([corpus["text"], sparse_generation]))
    n = 2000
    train, _, _ = build_datasets(plan, dict(config(vocab), sequence_length=100), [n, None, None])
    tokens, rows = {"text": 0, "generation": 0}, {"text": 0, "generation": 0}
    for i in range(n):
        item = train[i]
        family = plan.families[int(item["dataset_id"])]
        tokens[family] += int(item["tokens"].numel())  # the row's non-padding positions
        rows[family] += 1
    assert tokens["text"] / rows["text"] > 1.3 * tokens["generation"] / rows["generation"]
    for row in plan.family_table():
        realised = tokens[row["family"]] / sum(tokens.values())
        assert abs(realised - row["share"]) < 0.01, (row, tokens, rows)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory, tokenizer_path):
    """Text shards of 40, 40 and 3 records."""
    from megatron_ualm.data.cli import preprocess_text_main

    out = tmp_path_factory.mktemp("small")
    with open(out / "t.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"dog bark rain {i}"}) + "\n" for i in range(83))
    assert preprocess_text_main(["--input", str(out / "t.jsonl"), "--output", str(out / "text"), "--records-per-shard",
                                 "40", "--tokenizer", tokenizer_path, "--no-progress"]) == 0
    return str(out / "text")


def test_small_shards_train_under_the_default_split(small_text, corpus, vocab, caplog):
    """98,1,1 gives a 40-record shard one valid record and no test record, a 3- or 16-record one neither."""
    plan = plan_blend(find_shards([small_text, corpus["generation"]]))
    assert sorted(plan.samples) == [3, 16, 16, 16, 40, 40]
    train, valid, test = build_datasets(plan, dict(config(vocab), split="98,1,1"), [300, 20, 20])
    assert sorted(np.unique(np.asarray(train.dataset_index)).tolist()) == list(range(len(plan.shards)))
    forty = {i for i, n in enumerate(plan.samples) if n == 40}
    assert {int(valid[i]["dataset_id"]) for i in range(len(valid))} == forty  # the plan's index, not the split's
    assert len(valid) >= 20 and test is None
    assert "no shard has a record in the test split" in caplog.text
    assert "2 of 6 shards have records in the valid split" in caplog.text
    # Shards too small for any valid record: training still builds; evaluation is skipped (None).
    tiny = plan_blend([p for p, n in zip(plan.shards, plan.samples) if n < 40])
    train, valid, test = build_datasets(tiny, dict(config(vocab), split="98,1,1"), [100, 20, 20])
    assert len(train) >= 100 and valid is None and test is None
    with pytest.raises(ValueError, match="no shard has a record in the train split"):
        build_datasets(tiny, dict(config(vocab), split="1,1,98"), [100, 20, 20])


def batches(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def same(a, b):
    for k, v in vars(a).items():
        w = getattr(b, k)
        assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), k


def test_deterministic_and_resumable_from_consumed_samples(plan, vocab, tmp_path):
    mb = 4
    full, _, _ = build_datasets(plan, config(vocab, cache=str(tmp_path)), [200, None, None])
    again, _, _ = build_datasets(plan, config(vocab, cache=str(tmp_path)), [200, None, None])  # from the cache
    fresh, _, _ = build_datasets(plan, config(vocab), [200, None, None])  # rebuilt, no cache
    assert np.array_equal(full.dataset_index, fresh.dataset_index)
    run = batches(build_data_loader(full, SEQ, vocab, mb), 6)
    resumed = batches(build_data_loader(again, SEQ, vocab, mb, consumed_samples=3 * mb), 3)
    for a, b in zip(run[3:], resumed):
        same(a, b)
    rebuilt = batches(build_data_loader(fresh, SEQ, vocab, mb, consumed_samples=5 * mb), 1)
    same(run[5], rebuilt[0])
    # Two data-parallel ranks split each global batch without overlap.
    r0 = batches(build_data_loader(full, SEQ, vocab, 2, data_parallel_rank=0, data_parallel_size=2), 1)[0]
    r1 = batches(build_data_loader(full, SEQ, vocab, 2, data_parallel_rank=1, data_parallel_size=2), 1)[0]
    assert torch.equal(torch.cat([r0.tokens, r1.tokens]), run[0].tokens)
    other, _, _ = build_datasets(plan, config(vocab, seed=6), [200, None, None])
    assert not all(torch.equal(full[i]["tokens"], other[i]["tokens"]) for i in range(8))


def test_build_blend_tool(corpus, tmp_path, capsys):
    out = tmp_path / "blend.json"
    assert build_blend_main([corpus["root"] + "/*", "--output", str(out), "--upsample", "generation=3"]) == 0
    printed = capsys.readouterr().out
    for family in ("understanding", "generation", "text", "total"):
        assert family in printed
    plan = load_plan(str(out))
    assert plan.upsample["generation"] == 3.0
    assert sorted(set(plan.families)) == ["generation", "text", "understanding"]
    assert len(plan.shards) == 12  # pcm and mel understanding shards both found
    pairs = (tmp_path / "blend.data_path.txt").read_text().split()
    assert pairs[1::2] == plan.shards and np.allclose([float(w) for w in pairs[0::2]], plan.weights)


def test_build_blend_rejects_mixed_tokenizers(corpus, tmp_path, sentencepiece_path, capsys):
    from megatron_ualm.data.cli import preprocess_text_main

    manifest = tmp_path / "t.jsonl"
    manifest.write_text(json.dumps({"text": "dog"}) + "\n")
    assert preprocess_text_main(["--input", str(manifest), "--output", str(tmp_path / "sp"), "--tokenizer",
                                 sentencepiece_path, "--no-progress"]) == 0
    assert build_blend_main([corpus["text"], str(tmp_path / "sp"), "--output", str(tmp_path / "b.json")]) == 1
    err = capsys.readouterr().err
    assert "layout mismatch" in err and "tokenizer sha256" in err and str(tmp_path / "sp") in err
    with pytest.raises(SystemExit):
        build_blend_main([corpus["text"], "--output", str(tmp_path / "b.json"), "--upsample", "speech=2"])
