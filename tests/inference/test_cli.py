"""``python -m megatron_ualm.generate`` end to end: JSONL prompts in, WAVs and JSONL out."""

import json
import os
import subprocess
import sys

import pytest
import soundfile as sf


def run(*args):
    # A fresh world of one: drop the rendezvous variables this pytest process may have set.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_ualm.generate", *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_cli_tta_and_dialogue(tokenizer_path, codec_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "rain on a roof", "id": "rain", "answers": ["heavy rain"]}) + "\n"
                       + json.dumps({"prompt": "a dog barks"}) + "\n")
    common = ["--flavor", "debug", "--random-init", "--tokenizer", tokenizer_path, "--codec", codec_dir,
              "--prompts", str(prompts), "--max-audio-seconds", "0.2", "--min-audio-seconds", "0.2",
              "--max-new-tokens", "6"]
    out = tmp_path / "tta"
    run(*common, "--mode", "tta", "--out", str(out), "--prompt", "wind")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0000", "rain", "0002"]
    for r in rows:
        assert r["frames"] == [10]
        data, rate = sf.read(out / r["audio"][0])
        assert rate == 16000 and len(data) == 3200

    out = tmp_path / "dialogue"
    run(*common, "--mode", "dialogue", "--max-questions", "1", "--out", str(out))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(os.path.isfile(out / r["transcript"]) for r in rows)
    steps = json.loads((out / "rain" / "transcript.json").read_text())["steps"]
    answers = [s["text"] for s in steps if s["step"] == "answer"]
    assert answers in ([], ["heavy rain"])
