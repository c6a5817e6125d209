"""SFT data: chat and UALM-Reason records -> chat shards -> packed rows, with loss and CFG flags."""

import json
import os

import numpy as np
import pytest

from megatron_ualm.data.chat import ChatConverter, default_instructions, parse_loss_overrides
from megatron_ualm.data.errors import RecordError

K, CARD = 8, 64
PRECOMPUTED = dict(name="precomputed", num_codebooks=K, codebook_size=CARD, frame_rate=50)


def codes(frames, seed=0):
    return np.random.default_rng(seed).integers(0, CARD, (K, frames)).tolist()


RICH = {"keywords": ["rain", "car"], "layout": "rain, then a car at 3 s", "description": "light rain; a car hisses"}
REFLECTION = {"kind": "self_reflection", "prompt": "a rainy street", "rich_caption": RICH, "codes_1": codes(5, 1),
              "caption_1": "rain only", "critique": "the car is missing", "codes_2": codes(7, 2)}
DIALOGUE = {"kind": "dialogue", "prompt": "a nature sound",
            "turns": [{"question": "day or night", "answer": "night"}, {"question": "wind", "answer": "a little"}],
            "rich_caption": "Keywords: owl, wind", "codes": codes(4, 3)}


@pytest.fixture(scope="module")
def converter(tokenizer_path):
    return ChatConverter(tokenizer_path, codec_identity=PRECOMPUTED)


def layout(segments):
    return [(s.role, s.kind, s.loss, s.condition) for s in segments]


def test_self_reflection_layout_loss_and_conditions(converter):
    segs = converter.convert(REFLECTION)
    assert layout(segs) == [
        ("system", "text", False, False),
        ("user", "text", False, True),        # the request: condition of audio 1
        ("assistant", "text", True, False),   # the plan (rich caption)
        ("assistant", "audio_out", False, False),  # audio 1: the model's own first attempt, no loss
        ("user", "text", False, True),        # critique prompt with the caption of audio 1: condition of audio 2
        ("assistant", "text", True, False),   # the critique
        ("assistant", "audio_out", True, False),   # audio 2
    ]
    tok = converter.tokenizer
    assert tok.decode(segs[0].data) == tok.decode(tok.encode(default_instructions()["enrichment"]))
    caption, critique_prompt = tok.encode("rain only"), segs[4].data.tolist()
    assert any(critique_prompt[i:i + len(caption)] == caption for i in range(len(critique_prompt)))
    assert segs[3].data.tolist() == REFLECTION["codes_1"]


def test_loss_overrides_run_then_record(tokenizer_path):
    run = ChatConverter(tokenizer_path, codec_identity=PRECOMPUTED, loss=parse_loss_overrides(["audio_1=on"]))
    assert run.convert(REFLECTION)[3].loss is True
    record = dict(REFLECTION, loss={"audio_1": False, "critique": False, "prompt": True})
    segs = run.convert(record)
    assert [s.loss for s in segs] == [False, True, True, False, False, False, True]
    with pytest.raises(ValueError, match="part 'audio1'"):
        parse_loss_overrides(["audio1=on"])
    with pytest.raises(ValueError, match="PART=on"):
        parse_loss_overrides(["plan=maybe"])


def test_dialogue_and_enrichment(converter):
    segs = converter.convert(DIALOGUE)
    assert layout(segs) == [
        ("system", "text", False, False), ("user", "text", False, True),
        ("assistant", "text", True, False), ("user", "text", False, True),
        ("assistant", "text", True, False), ("user", "text", False, True),
        ("assistant", "text", True, False), ("assistant", "audio_out", True, False)]
    assert segs[0].data.tolist() == converter.tokenizer.encode(default_instructions()["dialogue"])
    enrich = converter.convert({"kind": "enrichment", "prompt": "rain", "rich_caption": RICH, "codes": codes(3),
                                "system": "Plan first."})
    assert [s.role for s in enrich] == ["system", "user", "assistant", "assistant"]
    assert enrich[0].data.tolist() == converter.tokenizer.encode("Plan first.")


def test_chat_messages_flags(converter):
    rec = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "make rain", "loss": True},
        {"role": "assistant", "codes": codes(3)},
        {"role": "human", "content": "louder", "condition": False},
        {"role": "gpt", "content": "here", "loss": False},
        {"role": "assistant", "codes": codes(2), "part": "audio_2"}]}
    assert layout(converter.convert(rec)) == [
        ("system", "text", False, False), ("user", "text", True, True), ("assistant", "audio_out", True, False),
        ("user", "text", False, False), ("assistant", "text", False, False), ("assistant", "audio_out", True, False)]
    off = ChatConverter(converter.tokenizer.path, codec_identity=PRECOMPUTED, loss={"audio_2": False, "user": True})
    assert [s.loss for s in off.convert(rec)] == [False, True, True, True, False, False]


@pytest.mark.parametrize("record, field, words", [
    (dict(REFLECTION, caption_1=None), "caption_1", "string"),
    (dict(REFLECTION, critique_prompt="no placeholder"), "critique_prompt", "{caption}"),
    (dict(REFLECTION, codes_1=None), "audio_1", "missing"),
    (dict(REFLECTION, codes_2=[[1, 2]] * 3), "codes_2", "K=8"),
    (dict(REFLECTION, codes_2=[[1, 99]] * K), "codes_2", "[0, 64)"),
    (dict(REFLECTION, loss={"sound": True}), "loss", "not one of"),
    (dict(DIALOGUE, turns=[]), "turns", "non-empty"),
    ({"kind": "monologue"}, "kind", "not one of"),
    ({"messages": [{"role": "user", "content": "a", "audio": "x.wav"}]}, "messages[0]", "exactly one"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role", "not one of"),
    ({"messages": [{"role": "user", "audio": "x.wav"}]}, "messages[0].audio", "no audio in"),
])
def test_bad_records_name_their_field(converter, record, field, words):
    with pytest.raises(RecordError) as err:
        converter.convert(record)
    assert err.value.field == field and words in err.value.reason, str(err.value)


@pytest.fixture(scope="module")
def chat_shards(tmp_path_factory, tokenizer_path, codec_dir, audio_dir):
    """The tool over a manifest mixing every kind, real clips (audio in and out) and bad records."""
    from megatron_ualm.data.cli import preprocess_chat_main

    out = tmp_path_factory.mktemp("chat")
    records = [
        {"messages": [{"role": "user", "content": "what is this"}, {"role": "user", "audio": "wav1.wav"},
                      {"role": "assistant", "content": "a low tone"}, {"role": "user", "content": "make a higher one"},
                      {"role": "assistant", "audio": {"path": "wav2.wav", "start": 0.1, "end": 0.9}}]},
        {"kind": "enrichment", "prompt": "a tone", "rich_caption": RICH, "audio": "wav3.wav"},
        DIALOGUE,
        dict(REFLECTION, codes_1=None, audio_1="wav0.wav", codes_2=None, audio_2="wav4.wav"),
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "audio": "missing.wav"}]},
        dict(REFLECTION, codes_2=[[1, 2]] * 3),
        {"kind": "enrichment", "prompt": "p", "rich_caption": RICH, "audio": "corrupt.wav"},
    ]
    manifest = out / "sft.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--input", str(manifest), "--output", str(out / "shards"), "--tokenizer", tokenizer_path,
            "--codec-path", codec_dir, "--flavor", "debug", "--audio-root", audio_dir, "--records-per-shard", "4",
            "--no-progress"]
    assert preprocess_chat_main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_tool_writes_chat_shards_and_names_bad_records(chat_shards):
    from megatron_ualm.data.shards import ShardReader

    out, _ = chat_shards
    shards = sorted(p for p in (out / "shards").iterdir() if p.is_dir())
    assert len(shards) == 2
    readers = [ShardReader(str(p)) for p in shards]
    assert all(r.meta["family"] == "chat" and set(r.meta["streams"]) == {"text", "codes", "audio"} for r in readers)
    docs = [r.document(d) for r in readers for d in range(len(r))]
    assert len(docs) == 4
    assert [s.kind for s in docs[0]] == ["text", "audio_in", "text", "text", "audio_out"]
    # Condition: the user text since the previous audio-out reply (both questions here), not the audio in.
    assert [(s.loss, s.condition) for s in docs[0]] == [(False, True), (False, False), (True, False), (False, True),
                                                        (True, False)]
    reflection = docs[3]
    assert [s.loss for s in reflection if s.kind == "audio_out"] == [False, True]  # stored loss bit survives
    rejected = [json.loads(line) for line in (out / "shards" / "chat.rejected.jsonl").read_text().splitlines()]
    assert [(r["source"].rsplit(":", 1)[1], r["field"]) for r in rejected] == [
        ("5", "messages[1].audio"), ("6", "codes_2"), ("7", "audio")]
    assert "does not exist" in rejected[0]["reason"]


def test_strict_stops_at_the_first_bad_record(chat_shards, capsys):
    from megatron_ualm.data.cli import preprocess_chat_main

    out, argv = chat_shards
    argv = [a if a != str(out / "shards") else str(out / "strict") for a in argv]
    assert preprocess_chat_main(argv + ["--strict"]) == 1
    assert "sft.jsonl:5" in capsys.readouterr().err


def test_packed_sft_rows_keep_loss_flags(chat_shards, debug_config, vocab):
    """UALMDataset over the chat shards: audio 1 of the reflection sample carries no target, audio 2 does."""
    from megatron_ualm.data.audio import AudioInConfig
    from megatron_ualm.data.blend import build_datasets, find_shards, plan_blend
    from megatron_ualm.data.sequence import Message, build_sample
    from megatron_ualm.data.shards import ShardReader

    out, _ = chat_shards
    plan = plan_blend(find_shards([str(out / "shards")]))
    assert set(plan.families) == {"chat"}
    train, _, _ = build_datasets(plan, dict(random_seed=1, sequence_length=1000, split="100,0,0", vocab=vocab,
                                            audio_in=AudioInConfig.from_model_config(debug_config),
                                            cfg_condition_dropout=0.0, path_to_cache=None, tokenizer=None,
                                            mmap_bin_files=True), [8, 0, 0])
    reader = ShardReader(plan.shards[0])  # the second shard holds only the rejected records
    reflection = reader.document(len(reader) - 1)
    expected = build_sample([Message(s.role, "text", text=s.data, loss=s.loss) if s.kind == "text" else
                             Message(s.role, "audio", codes=s.data, loss=s.loss) for s in reflection], vocab)
    audio_steps = [j for j in range(len(expected)) if expected.codes[:, j].ne(vocab.code_empty).any()]
    first, second = audio_steps[0], audio_steps[-1]
    assert not expected.code_target[:, first].any() and expected.code_target[:, second].any()
    found = 0
    for i in range(len(train)):
        item = train[i]
        start = 0
        for n in item["doc_lengths"].tolist():
            if n == len(expected) and np.array_equal(item["tokens"][start:start + n], expected.tokens):
                assert np.array_equal(item["code_target"][:, start:start + n], expected.code_target)
                assert np.array_equal(item["text_target"][start:start + n], expected.text_target)
                found += 1
            start += n
    assert found > 0


def test_cfg_dropout_empties_the_flagged_conditions(chat_shards):
    from megatron_ualm.data.dataset import drop_condition
    from megatron_ualm.data.shards import ShardReader

    out, _ = chat_shards
    reader = ShardReader(str(sorted(p for p in (out / "shards").iterdir() if p.is_dir())[0]))
    reflection = reader.document(len(reader) - 1)
    dropped = drop_condition(reflection, 0.999, np.random.default_rng(0))
    emptied = [i for i, (a, b) in enumerate(zip(reflection, dropped)) if a.data.size and not b.data.size]
    assert emptied == [1, 4]  # the request and the critique prompt (conditions of audio 1 and audio 2)
    assert [s.loss for s in dropped] == [s.loss for s in reflection]


def test_workers_with_the_codec_in_main_write_the_same_shards(chat_shards):
    """Two workers decode, this process encodes every pending clip (several per record): same bytes."""
    import filecmp

    from megatron_ualm.data.cli import preprocess_chat_main

    out, argv = chat_shards
    argv = [a if a != str(out / "shards") else str(out / "main") for a in argv]
    assert preprocess_chat_main(argv + ["--workers", "2", "--encode-in-main"]) == 0
    shards = sorted(p.name for p in (out / "shards").iterdir() if p.is_dir())
    assert shards == sorted(p.name for p in (out / "main").iterdir() if p.is_dir())
    for shard in shards:
        for name in ("text", "codes", "audio"):
            for ext in (".bin", ".idx"):
                assert filecmp.cmp(out / "shards" / shard / (name + ext), out / "main" / shard / (name + ext),
                                   shallow=False), (shard, name + ext)
