"""Field mapping expressions, presets, mapping files and the record assembly."""

from __future__ import annotations

import json
import re

import pytest

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.sources.fields import (PRESETS, FieldError, MappingMiss, NotFound, assemble,
                                               build_field_map, parse_expression)

SAMPLE = {"__key__": "000123", "json": {"text": ["a dog barks", "woof"], "meta": {"sr": 48000}},
          "chosen.flac": b"fLaC...", "flac": b"fLaC",
          "supervisions": [{"text": " hello "}, {"text": None}, {"text": "world"}], "title": "plain"}


@pytest.mark.parametrize("expr, value", [
    ("json.text[0]", "a dog barks"),
    ("json.text[-1]", "woof"),
    ("json.meta.sr", 48000),
    ("chosen.flac", b"fLaC..."),         # a member name with a dot: the longest key wins
    ('["chosen.flac"]', b"fLaC..."),
    ("flac", b"fLaC"),
    ("supervisions[*].text", "hello world"),  # text items joined, missing ones skipped
    ("supervisions[0].text", " hello "),
    ("json.caption|json.text[1]", "woof"),
    ("title[0]|title", "plain"),         # a string is not a list of characters
    ('"Describe the sound."', "Describe the sound."),
    ('json.nothing|"fallback | with bar"', "fallback | with bar"),
])
def test_expressions_find_values(expr, value):
    assert parse_expression(expr).evaluate(SAMPLE) == value


@pytest.mark.parametrize("expr", ["json.caption", "json.text[5]", "supervisions[1].text", "title[0]", "json.meta.sr.x"])
def test_expressions_that_find_nothing(expr):
    with pytest.raises(NotFound):
        parse_expression(expr).evaluate(SAMPLE)


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("json..text", "cannot read"),
    ("json.text[x]", "cannot read"),
    ("a||b", "empty alternative"),
    ('"unterminated', "not a JSON string"),
    ("json.", "not a field path"),
])
def test_malformed_expressions_say_what_is_valid(text, message):
    with pytest.raises(FieldError, match=re.escape(message)):
        parse_expression(text)


def test_a_mapping_that_finds_nothing_names_the_fields_the_sample_has():
    fields = build_field_map(["caption=json.caption", "start=json.start?"])
    with pytest.raises(MappingMiss) as err:
        fields.apply(SAMPLE, {}, "sample 000123 of a.tar")
    msg = str(err.value)
    assert err.value.field == "caption"
    assert "caption=json.caption finds nothing in sample 000123 of a.tar" in msg
    for name in ("json.text", "json.meta.sr", "flac (4 bytes)", "chosen.flac (7 bytes)", "supervisions[0].text"):
        assert name in msg
    # Optional mappings leave the field out; nested targets build objects.
    ok = build_field_map(["caption=json.text[0]", "start=json.start?", "chosen.audio=chosen.flac"])
    assert ok.apply(SAMPLE, {"keep": 1}) == {"keep": 1, "caption": "a dog barks", "chosen": {"audio": b"fLaC..."}}


def test_targets_are_the_fields_of_the_family_record():
    with pytest.raises(FieldError, match=r"generation records have no field 'captoin' \(did you mean caption\?\); "
                                         r"the targets are: audio, start, end, caption"):
        build_field_map(["captoin=json.text[0]"], family="generation")
    with pytest.raises(FieldError, match="understanding records have no field 'caption'"):
        build_field_map(["caption=json.text[0]"], family="understanding")
    assert build_field_map(["rich_caption.layout=json.layout"], family="generation").get("rich_caption.layout")
    # Chat and preference records take any field (a pair's sides are dotted: chosen.audio).
    assert build_field_map(["chosen.audio=chosen.flac"], family="preference").get("chosen.audio")


def test_a_text_target_that_finds_a_list_names_the_item_to_take():
    with pytest.raises(MappingMiss, match=r"caption=json.text finds a list of 2 in s, not one text: take an item, "
                                          r"e.g. json.text\[0\]"):
        build_field_map(["caption=json.text"]).apply(SAMPLE, {}, "s")
    with pytest.raises(MappingMiss, match=r"e.g. json.caption\[0\]\|json.text\[0\]"):
        build_field_map(["answer=json.caption|json.text?"]).apply(SAMPLE, {}, "s")
    assert build_field_map(["caption=supervisions[*].text"]).apply(SAMPLE, {}) == {"caption": "hello world"}


def test_flags_override_the_file_which_overrides_the_preset(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"answer": "json.text[1]", "start": "json.start?"}))
    fields = build_field_map(["question=\"What is it?\""], str(path), "laion-audio-630k", "understanding")
    assert fields.identity() == {"question": '"What is it?"', "answer": "json.text[1]", "start": "json.start?"}
    assert build_field_map(preset="lhotse-asr", family="generation").identity() == {"caption": "supervisions[*].text"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(flags=["caption"]), "expected TARGET=EXPRESSION"),
    (dict(flags=["9x=json.a"]), "expected TARGET=EXPRESSION"),
    (dict(preset="nope"), "choose one of"),
    (dict(preset="wavcaps", family="chat"), "not chat; give --field"),
])
def test_bad_mapping_flags(kwargs, message):
    with pytest.raises(FieldError, match=re.escape(message)):
        build_field_map(**kwargs)


def test_bad_mapping_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('["caption"]')
    with pytest.raises(FieldError, match="expected a JSON object"):
        build_field_map(fields_file=str(path))
    with pytest.raises(FieldError, match="No such file"):
        build_field_map(fields_file=str(tmp_path / "missing.json"))


def test_assembly_builds_the_family_record():
    assert assemble({"transcript": "hi"}, "generation")["caption"] == "hi"
    assert assemble({"caption": "c", "transcript": "hi"}, "generation")["caption"] == "c"
    rec = assemble({"transcript": "hello", "question": "Transcribe."}, "understanding")
    assert rec["conversations"] == [{"from": "human", "value": "<sound>\nTranscribe."}, {"from": "gpt", "value": "hello"}]
    with pytest.raises(MappingMiss, match="no question is given: add the question asked") as err:
        assemble({"answer": "x"}, "understanding")
    assert err.value.field == "question"
    with pytest.raises(RecordError, match="needs 'conversations'"):
        assemble({"question": "q"}, "understanding")
    kept = {"conversations": [{"from": "human", "value": "q"}], "question": "ignored"}
    assert assemble(dict(kept), "understanding") == kept


def test_every_preset_parses_for_its_families():
    for preset in PRESETS.values():
        for family in preset.fields:
            assert build_field_map(preset=preset.name, family=family).fields
