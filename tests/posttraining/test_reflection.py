"""The self-reflection data builder end to end on tiny random parts (debug model, X-Codec, a
random Qwen2 critic), in the three invocations a cluster runs: the model's first pass (audio 1
and its own caption; two data-parallel ranks), the critic alone, then audio 2 and the records
(two ranks again); the records feed tools/preprocess_chat.py. An outside critic's JSONL, joined
by id, takes the critic model's place.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatron_ualm.posttraining import reflection as R
from ualm_testing import run_ok, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "build_reflection_data.py")
RICH = {"keywords": ["dog", "rain"], "layout": "rain, then a bark", "description": "a dog barks in the rain"}


def test_conversations_are_the_training_layout():
    from megatron_ualm.data.chat import default_instructions, record_turns

    rec = {"prompt": "a wet dog", "rich_caption": RICH}
    first = R.reflection_turns(rec)
    assert [t.part for t in first] == ["system", "prompt", "plan"]
    full = record_turns({**rec, "kind": "self_reflection", "codes_1": [[1]] * 8, "caption_1": "a tone",
                         "critique": "no dog", "audio_2": "x.wav"}, default_instructions())
    second = R.reflection_turns(rec, [[1]] * 8, "a tone", "no dog")
    assert [(t.part, t.text, t.codes) for t in second] == [(t.part, t.text, t.codes) for t in full[:-1]]
    assert second[-2].text.startswith("This is what your audio sounds like: a tone")


def test_bad_records_and_critic_files_are_named(tmp_path):
    path = tmp_path / "plans.jsonl"
    for line, message in (({"prompt": "x"}, r"plans.jsonl:1: field 'rich_caption': is missing"),
                          ({"prompt": "x", "rich_caption": RICH, "audio": "gone.wav"},
                           r"plans.jsonl:1: field 'audio': audio file .*gone.wav does not exist"),
                          ({"prompt": "x", "rich_caption": RICH, "codes": [[1, 2], [3]]},
                           r"plans.jsonl:1: field 'codes': must be a K x T list")):
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=message):
            R.read_plans([str(path)])
    critic = tmp_path / "critic.jsonl"
    critic.write_text('{"id": "a", "critique": "x"}\n{"id": "a", "critique": "y"}\n')
    with pytest.raises(ValueError, match="critic.jsonl:2: id 'a' appears twice"):
        R.read_critic_file(str(critic))
    critic.write_text('{"id": "a", "critique": 3}\n')
    with pytest.raises(ValueError, match="field 'critique' must be a string"):
        R.read_critic_file(str(critic))
    critic.write_text('{"id": "a", "critique": " fine "}\n{"id": "b", "critique": null}\n')
    assert R.read_critic_file(str(critic)) == {"a": "fine"}


def _run(*args, nproc=0):
    """The tool in one process, or in ``nproc`` torchrun ranks."""
    return run_ok(torchrun(nproc, TOOL, *args) if nproc else [sys.executable, TOOL, *args], timeout=600)


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_path, codec_dir, audio_dir):
    """The three invocations, the model's with two data-parallel ranks (each decodes its groups of
    two records; for audio 2 only the second has records); returns the output folder and the inputs."""
    from megatron_ualm.tiny.critic import write_tiny_critic

    root = tmp_path_factory.mktemp("reflection")
    plans = root / "plans.jsonl"
    rows = [{"id": "clip", "prompt": "a wet dog", "rich_caption": RICH, "audio": "wav2.wav", "start": 0.1, "end": 0.5},
            {"id": "codes", "prompt": "rain", "rich_caption": "Keywords: rain", "codes": [[3, 4, 5]] * 8},
            {"id": "gen1", "prompt": "a bell", "rich_caption": {"keywords": ["bell"]}},
            {"id": "gen2", "prompt": "wind", "rich_caption": {"description": "wind in the trees"},
             "system": "plan, then make the sound", "critique_prompt": "you made: {caption}. what is wrong?"}]
    plans.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(root / "out")
    inputs = ["--input", str(plans), "--audio-root", audio_dir, "--out", out, "--no-progress"]
    model = ["--random-init", "--flavor", "debug", "--tokenizer", tokenizer_path, "--codec", codec_dir,
             "--batch-size", "2", "--max-audio-seconds", "0.3", "--min-audio-seconds", "0.2", "--max-new-tokens", "6",
             "--text-temperature", "1.0", "--seed", "3"]
    logs = [_run(*inputs, *model, "--write-wavs", nproc=2)]
    critic = write_tiny_critic(str(root / "critic"))
    logs.append(_run(*inputs, "--critic-model", critic, "--critic-max-new-tokens", "6"))
    logs.append(_run(*inputs, *model, "--write-wavs", nproc=2))
    return {"out": out, "rows": rows, "logs": logs, "inputs": inputs, "model": model, "critic": critic,
            "audio_dir": audio_dir}


@pytest.mark.slow
def test_stages_write_what_the_next_reads(built):
    out, logs = built["out"], built["logs"]
    assert "4 record(s) for a critic" in logs[0] and "await a critique" in logs[0]
    assert "2 record(s) without target audio need audio 2 generated" in logs[1]
    assert "4 self-reflection records of 4" in logs[2]
    first = {r["id"]: r for name in ("first_pass.task-00000-of-00002.jsonl", "first_pass.task-00001-of-00002.jsonl")
             for r in _lines(os.path.join(out, name))}
    requests = _lines(os.path.join(out, "critic_requests.jsonl"))
    assert [r["id"] for r in requests] == ["clip", "codes", "gen1", "gen2"]
    assert all(r["critique"] is None and r["caption_1"] == first[r["id"]]["caption_1"] for r in requests)
    assert requests[0]["plan"] == "Keywords: dog, rain\nLayout: rain, then a bark\nDescription: a dog barks in the rain"
    import soundfile as sf

    wave, rate = sf.read(os.path.join(out, requests[0]["audio_1"]))
    assert rate == 16000 and len(wave) == first["clip"]["frames"] * 320
    critiques = {r["id"]: r for r in _lines(os.path.join(out, "critiques.jsonl"))}
    assert set(critiques) == {"clip", "codes", "gen1", "gen2"} and all(c["critique"] for c in critiques.values())
    refined = {r["id"]: r for r in _lines(os.path.join(out, "refined.task-00001-of-00002.jsonl"))}
    assert set(refined) == {"gen1", "gen2"}  # the records without a target

    records = {r["id"]: r for r in _lines(os.path.join(out, "self_reflection.jsonl"))}
    for rid, r in records.items():
        assert r["kind"] == "self_reflection" and r["critique"] == critiques[rid]["critique"]
        assert r["caption_1"] == first[rid]["caption_1"]
        with np.load(os.path.join(out, first[rid]["codes"])) as z:
            assert r["codes_1"] == z["codes"].tolist() and 10 <= len(r["codes_1"][0]) <= 15
    assert records["clip"]["audio_2"] == os.path.join(built["audio_dir"], "wav2.wav")
    assert (records["clip"]["start"], records["clip"]["end"]) == (0.1, 0.5)
    assert records["codes"]["codes_2"] == [[3, 4, 5]] * 8
    with np.load(os.path.join(out, refined["gen1"]["codes"])) as z:
        assert records["gen1"]["codes_2"] == z["codes"].tolist()
    assert records["gen2"]["critique_prompt"] == "you made: {caption}. what is wrong?"
    assert json.load(open(os.path.join(out, "summary.json")))["audio_2"] == {"target": 2, "generated": 2}


def test_records_feed_preprocess_chat(built, tmp_path, tokenizer_path, codec_dir):
    from megatron_ualm.data.shards import ShardReader
    from megatron_ualm.data.cli import preprocess_chat_main

    out = str(tmp_path / "chat")
    assert preprocess_chat_main(["--input", os.path.join(built["out"], "self_reflection.jsonl"), "--output", out,
                                 "--tokenizer", tokenizer_path, "--codec-path", codec_dir, "--flavor", "debug",
                                 "--no-progress"]) == 0
    task = json.load(open(os.path.join(out, "chat.task-00000-of-00001.json")))
    assert task["counts"]["samples"] == 4 and task["counts"]["rejected"] == 0
    doc = ShardReader(os.path.join(out, "chat-00000")).document(0)
    # system, prompt, plan, audio 1, caption-1 prompt, critique, audio 2; audio 1 carries no loss
    assert [(s.role, s.kind, bool(s.loss)) for s in doc] == [
        ("system", "text", False), ("user", "text", False), ("assistant", "text", True),
        ("assistant", "audio_out", False), ("user", "text", False), ("assistant", "text", True),
        ("assistant", "audio_out", True)]


def test_outside_critic_file_joins_by_id(built, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(built["out"], out)
    inputs = [a if a != built["out"] else out for a in built["inputs"]]
    filled = [dict(r, critique=f"more {r['id']}") if r["id"] in ("clip", "codes") else r
              for r in _lines(os.path.join(out, "critic_requests.jsonl"))]
    critic_file = tmp_path / "filled.jsonl"
    critic_file.write_text("".join(json.dumps(r) + "\n" for r in filled))
    # No model flags: the records with a target assemble; the others lack a critique and are skipped.
    args = R.parse_args([*inputs, "--critic-file", str(critic_file)])
    R.run(args)
    records = {r["id"]: r for r in _lines(os.path.join(out, "self_reflection.jsonl"))}
    assert {k: r["critique"] for k, r in records.items()} == {"clip": "more clip", "codes": "more codes"}
    assert json.load(open(os.path.join(out, "summary.json")))["skipped"]["no_critique"] == 2
    # A critique that differs from the one audio 2 was generated after is refused, naming the record.
    filled = [dict(r, critique="something else") for r in filled]
    critic_file.write_text("".join(json.dumps(r) + "\n" for r in filled))
    with pytest.raises(ValueError, match="record 'gen1' \\(and 1 more\\): its critique differs"):
        R.run(R.parse_args([*inputs, "--critic-file", str(critic_file)]))


def test_help_and_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--critic-model" in proc.stdout and "Audio 2" in proc.stdout
    plans = tmp_path / "p.jsonl"
    plans.write_text("{}\n")
    for extra, message in ((["--critic-model", str(tmp_path), "--critic-file", str(plans)], "give one critic"),
                           (["--critic-template", "no fields"], "must contain {plan} and {caption}"),
                           (["--random-init"], "--random-init needs --flavor")):
        proc = subprocess.run([sys.executable, TOOL, "--input", str(plans), "--out", str(tmp_path / "o"), *extra],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
