"""Batches from the shards feed the debug model: placeholders, windows and packing line up."""

from __future__ import annotations

import math

import torch

from megatron_ualm.data.audio import AudioInConfig
from megatron_ualm.data.blend import build_data_loader, build_datasets, find_shards, plan_blend


def test_blended_batches_run_through_the_model(corpus, vocab, debug_config, parallel_world_of_one):
    from megatron_ualm import api

    assert AudioInConfig.from_model_config(debug_config) == AudioInConfig(16, 2)
    plan = plan_blend(find_shards([corpus["text"], corpus["generation"], corpus["understanding"]]))
    train, _, _ = build_datasets(plan, dict(random_seed=0, sequence_length=128, split="100,0,0", vocab=vocab,
                                            audio_in=AudioInConfig.from_model_config(debug_config)), [48, 0, 0])
    torch.manual_seed(0)
    model = api.build_model("debug")
    seen_audio_in = seen_packed = 0
    for batch in build_data_loader(train, 128, vocab, micro_batch_size=4):
        placeholders = int((batch.tokens == vocab.audio_in).sum())
        assert placeholders == batch.num_audio_in_placeholders
        if batch.audio_in_features is not None:
            assert batch.audio_in_features.shape[1:] == (16, 200)
            seen_audio_in += 1
        seen_packed += int(batch.attention_mask is not None)
        result = api.run_batch(model, batch)
        assert math.isfinite(float(result.loss)) and float(result.num_tokens) > 0
    assert seen_audio_in and seen_packed
