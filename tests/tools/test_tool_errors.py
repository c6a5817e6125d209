"""User errors of the data tools end in one line on stderr that says what to do, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_ualm.data.cli import (build_blend_main, inspect_shards_main, preprocess_generation_main,
                                    preprocess_text_main, preprocess_understanding_main)
from megatron_ualm.data.codec import CodecLoadError, XCodec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAINS = {"preprocess_text": preprocess_text_main, "preprocess_generation": preprocess_generation_main,
         "preprocess_understanding": preprocess_understanding_main, "inspect_shards": inspect_shards_main}


@pytest.fixture
def inputs(tmp_path, tokenizer_path, sentencepiece_path):
    """Paths for the cases: a manifest, a CSV, a JSON array, a checkpoint of another model, a file."""
    (tmp_path / "m.jsonl").write_text(json.dumps({"text": "dog bark"}) + "\n")
    (tmp_path / "m.csv").write_text("text,caption\ndog,bark\n")
    (tmp_path / "array.json").write_text(json.dumps([{"text": "dog"}], indent=1))
    (tmp_path / "hubert").mkdir()
    (tmp_path / "hubert" / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    (tmp_path / "a_file").write_text("")
    return {k: str(v) for k, v in dict(dir=tmp_path, manifest=tmp_path / "m.jsonl", csv=tmp_path / "m.csv",
                                       array=tmp_path / "array.json", hubert=tmp_path / "hubert",
                                       file=tmp_path / "a_file").items()} | dict(tok=tokenizer_path, sp=sentencepiece_path)


def text(p, **kw) -> list[str]:
    args = dict(input=p["manifest"], output=os.path.join(p["dir"], "out"), tokenizer=p["tok"]) | kw
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)] + ["--no-progress"]


CASES = {
    "missing manifest": ("preprocess_text", lambda p: text(p, input=os.path.join(p["dir"], "nope.jsonl")),
                         ["manifest", "nope.jsonl does not exist"]),
    "manifest glob that matches nothing": ("preprocess_text",
                                           lambda p: text(p, input=os.path.join(p["dir"], "n*.jsonl")),
                                           ["--input", "n*.jsonl matches no file"]),
    "CSV manifest": ("preprocess_text", lambda p: text(p, input=p["csv"]), ["m.csv is not JSON Lines", "read_csv"]),
    "JSON array manifest": ("preprocess_text", lambda p: text(p, input=p["array"]), ["first line is not a JSON object"]),
    "missing tokenizer": ("preprocess_text", lambda p: text(p, tokenizer=os.path.join(p["dir"], "tok.json")),
                          ["--tokenizer", "does not exist", "sentencepiece .model"]),
    "not a tokenizer": ("preprocess_text", lambda p: text(p, tokenizer=p["manifest"]),
                        ["cannot be read as a tokenizer", "tokenizer.json"]),
    "output is a file": ("preprocess_text", lambda p: text(p, output=p["file"]), ["is a file", "directory"]),
    "task out of range": ("preprocess_text", lambda p: text(p, num_tasks="2", task_index="2"),
                          ["task index 2 is not in [0, 2)", "--array=0-1"]),
    "missing codec path": ("preprocess_generation", lambda p: text(p, codec_path=os.path.join(p["dir"], "xcodec")),
                           ["--codec-path", "does not exist", "save_pretrained"]),
    "codec dir without config": ("preprocess_generation", lambda p: text(p, codec_path=p["dir"]),
                                 ["has no config.json"]),
    "checkpoint of another model": ("preprocess_generation", lambda p: text(p, codec_path=p["hubert"]),
                                    ["holds a 'hubert' checkpoint", "not 'xcodec'"]),
    "unknown flavor": ("preprocess_understanding", lambda p: text(p, flavor="qwen9"), ["--flavor", "qwen2.5-7b"]),
    "no shards there": ("inspect_shards", lambda p: [os.path.join(p["dir"], "nope")],
                        ["no such shard directory"]),
}


def one_line(err: str) -> str:
    """The error line; a run may print Megatron-Core's one-time backend notice before it."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("[megatron_ualm]")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line(case, inputs, capsys):
    tool, argv, expected = CASES[case]
    capsys.readouterr()
    assert MAINS[tool](argv(inputs)) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and all(e in line for e in expected), line
    assert not os.path.exists(os.path.join(inputs["dir"], "out")), "nothing is written before the inputs check out"


def test_output_of_another_run_is_one_line(inputs, capsys):
    assert preprocess_text_main(text(inputs)) == 0
    capsys.readouterr()
    assert preprocess_text_main(text(inputs, tokenizer=inputs["sp"])) == 2
    line = one_line(capsys.readouterr().err)
    assert "holds shards of another run" in line and "sp.model here" in line and "new --output" in line


def test_a_manifest_glob_reads_what_listing_its_files_reads(inputs):
    d = inputs["dir"]
    (d_m2 := os.path.join(d, "m2.jsonl")) and open(d_m2, "w").write(json.dumps({"text": "cat meow"}) + "\n")
    assert preprocess_text_main(text(inputs, input=os.path.join(d, "m*.jsonl"), output=os.path.join(d, "glob"))) == 0
    listed = os.path.join(d, "listed")
    assert preprocess_text_main([*text(inputs, output=listed), "--input", inputs["manifest"], d_m2]) == 0
    runs = [json.load(open(os.path.join(d, out, "text.run.json"))) for out in ("glob", "listed")]
    assert runs[0]["records"] == 2 and runs[0]["run_key"] == runs[1]["run_key"]
    shards = [open(os.path.join(d, out, "text-00000", "text.bin"), "rb").read() for out in ("glob", "listed")]
    assert shards[0] == shards[1]


def test_a_run_that_keeps_nothing_says_why(inputs, capsys):
    with open(inputs["manifest"], "w") as f:
        f.write(json.dumps({"body": "dog bark"}) + "\n" + json.dumps({"body": "cat", "id": 3}) + "\n")
    assert preprocess_text_main(text(inputs)) == 1
    err = capsys.readouterr().err
    assert "2 of 2 records rejected" in err
    needs = "needs 'text' (plain text) or 'messages' (a chat)"
    assert (f"nothing was kept; most often (2 records): text: {needs}; the first: {inputs['manifest']}:1: field "
            f"'text': {needs}: the record has body\n") in err
    reasons = [json.loads(line)["reason"] for line in open(os.path.join(inputs["dir"], "out", "text.rejected.jsonl"))]
    assert reasons == [f"{needs}: the record has body", f"{needs}: the record has body, id"]
    # The blend of such a set says where the reasons are.
    out = os.path.join(inputs["dir"], "out")
    assert build_blend_main([out, "--output", os.path.join(inputs["dir"], "blend.json")]) == 1
    line = one_line(capsys.readouterr().err)
    assert line == (f"error: every shard is empty (1): preprocessing kept no record (empty inputs, or every record "
                    f"rejected: see {out}/*.rejected.jsonl)")


def test_codec_checks_its_directory_before_loading(tmp_path):
    with pytest.raises(CodecLoadError, match="does not exist"):
        XCodec(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(CodecLoadError, match="no config.json"):
        XCodec(str(tmp_path), device="cpu")


@pytest.mark.parametrize("case", ["CSV manifest", "missing tokenizer", "missing codec path", "no shards there"])
def test_tool_script_prints_no_traceback(case, inputs):
    tool, argv, expected = CASES[case]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *argv(inputs)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    assert all(e in line for e in expected), line



@pytest.mark.parametrize("flag", ["--workers", "--records-per-shard"])
def test_counts_below_one_are_refused_by_the_parser(flag, inputs, capsys):
    with pytest.raises(SystemExit) as stop:
        preprocess_text_main([*text(inputs), flag, "0"])
    assert stop.value.code == 2 and "expected a whole number >= 1, got 0" in capsys.readouterr().err
