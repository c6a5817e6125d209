"""The corpus flags on every preprocessing tool: help, format detection, one-line user errors."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from megatron_ualm.data.cli import preprocess_understanding_main
from megatron_ualm.data.sources import CorpusError, detect_format, open_corpus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.parametrize("tool", ["preprocess_text", "preprocess_generation", "preprocess_understanding",
                                  "preprocess_chat", "preprocess_preferences"])
def test_every_tool_explains_the_corpus_flags(tool):
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), "--help"],
                         capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "400"}).stdout
    flat = " ".join(out.split())
    for text in ("--input-format", "webdataset", "lhotse-shar", "hf-parquet", "wavcaps", "--field TARGET=EXPR",
                 "caption=supervisions[0].text", "--fields-file", "laion-audio-630k", "audiocaps-hub", "lhotse-asr",
                 "brace ranges"):
        assert text in flat, text


def namespace(inputs, **kw) -> argparse.Namespace:
    return argparse.Namespace(input=inputs, input_format="auto", field=[], fields_file=None, preset=None,
                              audio_root=None, **kw)


def test_formats_are_detected_from_the_inputs(tmp_path):
    import gzip

    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "m.jsonl").write_text('{"text": "x"}\n')
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "c", "start": 0, "duration": 1, "type": "MonoCut"}) + "\n")
    (tmp_path / "shar").mkdir()
    (tmp_path / "shar" / "cuts.000000.jsonl.gz").write_bytes(b"")
    assert [detect_format(str(tmp_path / p)) for p in ("a.tar", "m.jsonl", "train.jsonl.gz", "shar", ".")] == [
        "webdataset", "manifest", "lhotse", "lhotse-shar", "webdataset"]  # a folder of tars, too
    # Manifests without a mapping are read as always (no corpus reader).
    assert open_corpus(namespace([str(tmp_path / "m.jsonl")]), "text") is None
    with pytest.raises(CorpusError, match="mixes formats"):
        open_corpus(namespace([str(tmp_path / "a.tar"), str(tmp_path / "m.jsonl")]), "text")
    wrong = namespace([str(tmp_path / "a.tar")])
    wrong.preset = "wavcaps"
    with pytest.raises(CorpusError, match="--preset wavcaps reads wavcaps input, but --input looks like webdataset"):
        open_corpus(wrong, "generation")


def test_corpus_user_errors_are_one_line(tmp_path, tokenizer_path, capsys):
    base = ["--output", str(tmp_path / "out"), "--tokenizer", tokenizer_path, "--no-progress"]
    for argv, expected in (
        (["--input", str(tmp_path / "x-{000000..000001}.tar")], "does not exist (expanded from the brace range)"),
        (["--input", str(tmp_path / "none-*.tar")], "matches no file"),
        (["--input", str(tmp_path), "--input-format", "webdataset"], "is a directory; give the tar shards"),
        (["--input", str(tmp_path), "--field", "caption"], "expected TARGET=EXPRESSION"),
        (["--input", str(tmp_path), "--preset", "wavcaps", "--input-format", "wavcaps"], "needs --audio-root"),
    ):
        capsys.readouterr()
        assert preprocess_understanding_main([*argv, *base]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[megatron")]
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not os.path.exists(tmp_path / "out")
