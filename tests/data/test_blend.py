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


def test_realised_proportions_over_10k_samples(plan, vocab):
    train, _, _ = build_datasets(plan, config(vocab), [10000, None, None])
    index = np.asarray(train.dataset_index[:10000])
    share = {row["family"]: row["share"] for row in plan.family_table()}
    for family, planned in share.items():
        ids = [i for i, f in enumerate(plan.families) if f == family]
        assert abs(np.isin(index, ids).mean() - planned) < 0.01, family
    # Every drawn row really comes from its shard's family.
    for i in range(0, 10000, 997):
        item = train[i]
        family = plan.families[int(item["dataset_id"])]
        has_audio_out = bool((item["tokens"] == vocab.audio_out).any())
        assert has_audio_out == (family == "generation")


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
    assert "another tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_blend_main([corpus["text"], "--output", str(tmp_path / "b.json"), "--upsample", "speech=2"])
