"""Preference manifests -> paired shards -> pair items: bad records named, layout checked, resumable."""

import json

import numpy as np
import pytest
import torch

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.preference import PreferenceConverter, split_pair
from megatron_ualm.data.shards import Segment, ShardError

PRECOMPUTED = dict(name="precomputed", num_codebooks=8, codebook_size=64, frame_rate=50)


def codes(frames, seed=0):
    return np.random.default_rng(seed).integers(0, 64, (8, frames)).tolist()


@pytest.fixture(scope="module")
def converter(tokenizer_path, audio_dir, debug_config):
    from megatron_ualm.data.audio import AudioInConfig

    return PreferenceConverter(tokenizer_path, codec_identity=PRECOMPUTED, audio_root=audio_dir,
                               audio_in=AudioInConfig.from_model_config(debug_config))


def test_pair_layout_and_split(converter):
    rec = {"prompt": [{"role": "system", "content": "rain"}, {"role": "user", "audio": "wav1.wav"},
                      {"role": "assistant", "content": "dog bark", "part": "plan"}],
           "chosen": [{"content": "rain wind"}, {"codes": codes(5)}], "rejected": {"codes": codes(4, 1)}}
    segs = converter.convert(rec)
    assert [(s.role, s.kind, s.loss) for s in segs] == [
        ("system", "text", False), ("user", "audio_in", False), ("assistant", "text", False),
        ("assistant", "text", True), ("assistant", "audio_out", True),
        ("system", "text", False), ("user", "audio_in", False), ("assistant", "text", False),
        ("assistant", "audio_out", True)]
    prompt, chosen, rejected = split_pair(segs, "test")
    assert len(prompt) == 3 and [s.kind for s in chosen] == ["text", "audio_out"] and len(rejected) == 1
    assert rejected[0].data.tolist() == codes(4, 1)


@pytest.mark.parametrize("record, field, words", [
    ({"prompt": "p", "rejected": "a"}, "chosen", "missing"),
    ({"prompt": "p", "chosen": "a dog", "rejected": "a dog"}, "rejected", "identical"),
    ({"prompt": "p", "chosen": {"codes": codes(3)}, "rejected": {"codes": codes(3)}}, "rejected", "identical"),
    ({"prompt": [{"role": "user", "audio": "nowhere.wav"}], "chosen": "a", "rejected": "b"}, "prompt[0].audio",
     "does not exist"),
    ({"prompt": "p", "chosen": {"audio": "wav2.wav"}, "rejected": "b"}, "chosen.audio", "no codec"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}, "chosen.content", "assistant"),
    ({"prompt": [{"role": "user", "content": "x", "loss": True}], "chosen": "a", "rejected": "b"}, "prompt[0].content",
     "context only"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt", "non-empty"),
    ({"prompt": "p", "chosen": "a", "rejected": {"codes": [[1, 2]]}}, "rejected.codes", "K=8"),
])
def test_bad_pairs_are_named(converter, record, field, words):
    with pytest.raises(RecordError) as err:
        converter.convert(record)
    assert err.value.field == field and words in err.value.reason, str(err.value)


def test_split_pair_refuses_other_documents():
    text = lambda loss: Segment("user" if not loss else "assistant", "text", np.arange(3, dtype=np.int32), loss=loss)  # noqa: E731
    with pytest.raises(ShardError, match="not a preference pair"):
        split_pair([text(False), text(True)], "shard record 0")  # one conversation
    other = Segment("user", "text", np.arange(4, dtype=np.int32), loss=False)
    with pytest.raises(ShardError, match="do not share the prompt"):
        split_pair([text(False), text(True), other, text(True)], "shard record 1")


RECORDS = [
    {"prompt": "a dog", "chosen": {"codes": codes(6, 1)}, "rejected": {"codes": codes(6, 2)}},
    {"prompt": [{"role": "user", "audio": "wav0.wav"}, {"role": "user", "content": "what"}],
     "chosen": "a tone", "rejected": "rain"},
    {"prompt": "x", "chosen": "same", "rejected": "same"},
    {"prompt": "rain", "chosen": {"audio": "wav3.wav"}, "rejected": {"audio": "missing.wav"}},
    {"prompt": "rain", "chosen": "a b", "rejected": "c d"},
    {"prompt": "wind", "rejected": "c d"},
    {"prompt": "door", "chosen": [{"content": "slam"}, {"codes": codes(3, 3)}], "rejected": "a door"},
]


@pytest.fixture(scope="module")
def pair_shards(tmp_path_factory, tokenizer_path, codec_dir, audio_dir):
    from megatron_ualm.data.cli import preprocess_preferences_main

    out = tmp_path_factory.mktemp("prefs")
    manifest = out / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    argv = ["--input", str(manifest), "--tokenizer", tokenizer_path, "--codec-path", codec_dir, "--flavor", "debug",
            "--audio-root", audio_dir, "--records-per-shard", "4", "--no-progress"]
    assert preprocess_preferences_main(argv + ["--output", str(out / "shards")]) == 0
    return out, argv


def test_tool_names_bad_pairs_strict_and_resumes(pair_shards, capsys):
    from megatron_ualm.data.cli import preprocess_preferences_main

    out, argv = pair_shards
    rejected = [json.loads(line) for line in (out / "shards" / "preference.rejected.jsonl").read_text().splitlines()]
    assert [(r["source"].rsplit(":", 1)[1], r["field"]) for r in rejected] == [
        ("3", "rejected"), ("4", "rejected.audio"), ("6", "chosen")]
    capsys.readouterr()
    assert preprocess_preferences_main(argv + ["--output", str(out / "shards")]) == 0  # a rerun keeps the shards
    said = capsys.readouterr()
    assert f"3 of {len(RECORDS)} records rejected" in said.err and str(out / "shards" / "preference.rejected.jsonl") in said.err
    assert json.loads(said.out)["rejected_file"] == str(out / "shards" / "preference.rejected.jsonl")
    assert preprocess_preferences_main(argv + ["--output", str(out / "shards")]) == 0
    assert json.loads(capsys.readouterr().out)["shards_kept"] == 2
    assert preprocess_preferences_main(argv + ["--output", str(out / "strict"), "--strict"]) == 1
    assert "pairs.jsonl:3" in capsys.readouterr().err


def test_pair_items_hold_prompt_plus_response_rows(pair_shards, debug_config, vocab):
    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.data.blend import build_datasets, find_shards, plan_blend
    from megatron_ualm.data.dataset import UALMDataset
    from megatron_ualm.data.preference import PairCollate, PreferenceDataset
    from megatron_ualm.data.shards import ShardReader

    out, _ = pair_shards
    plan = plan_blend(find_shards([str(out / "shards")]))
    kwargs = dict(random_seed=3, sequence_length=400, split="100,0,0", vocab=vocab, cfg_condition_dropout=0.0,
                  audio_in=AudioInConfig.from_model_config(debug_config), path_to_cache=None, tokenizer=None,
                  mmap_bin_files=True)
    train, _, _ = build_datasets(plan, kwargs, [10, 0, 0], dataset_cls=PreferenceDataset)
    with pytest.raises(ValueError, match="preference pairs"):
        build_datasets(plan, kwargs, [4, 0, 0])  # the packed dataset refuses pair shards
    items = [train[i] for i in range(len(train))]
    assert len(items) >= 10
    for it in items:
        shard, record = it["key"]
        segs = ShardReader(plan.shards[shard]).document(record)
        prompt, chosen, rejected = split_pair(segs, "t")
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            row = it[side]
            assert int(row["doc_lengths"].sum()) == row["tokens"].numel()
            # Targets lie in the response only: everything before its first position is context.
            first = int(torch.nonzero(row["text_target"])[0])
            expected_prompt = 1 + sum(3 + s.units() for s in prompt)
            assert first == expected_prompt + 1  # the response's modality marker (after its role marker)
    batch = PairCollate(400, vocab)(items[:3])
    assert batch.num_pairs == 3 and batch.rows.tokens.shape[0] == 6 and batch.keys == [it["key"] for it in items[:3]]
    assert batch.rows.family_counts["preference"] == 6
    with pytest.raises(ValueError, match="CFG|cfg_condition_dropout"):
        build_datasets(plan, dict(kwargs, cfg_condition_dropout=0.1), [4, 0, 0], dataset_cls=PreferenceDataset)
    assert issubclass(PreferenceDataset, UALMDataset)
