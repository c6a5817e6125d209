"""The preference-pair builder: the rule on fixed scores, the journal, prompt records, and the tool
end to end on tiny random parts (debug model, X-Codec, CLAP, aesthetics).

End to end, a TP=2 run is the reference; a one-process run killed after its first prompts (and
left with a torn journal line and a stray temporary file) then resumed writes the same
manifests byte for byte, which the data tools take without a rejected record.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_ualm.evaluation.scorers import Scorer
from megatron_ualm.posttraining import jobs
from megatron_ualm.posttraining import pairs as P
from ualm_testing import child_env, run_ok, torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "make_preference_pairs.py")


# ---------------------------------------------------------------------------------------------
# The rule on fixed scores.

def aes(v):
    return {"aes": v, **{a: v + 1.0 for a in P.AES_AXES}}


def test_rule_picks_best_and_worst_by_weighted_z_scores():
    # Candidate 2 has the best CLAP, candidate 1 the best AES; by z-scores over the run,
    # CLAP spreads 0.1 and AES 1.0, so each counts by its own spread.
    scores = [{"clap": 0.20, **aes(6.0)}, {"clap": 0.10, **aes(7.0)}, {"clap": 0.40, **aes(6.5)}, None]
    stats = P.metric_stats(scores)
    mc, sc = np.mean([0.2, 0.1, 0.4]), np.std([0.2, 0.1, 0.4])
    ma, sa = 6.5, np.std([6.0, 7.0, 6.5])
    want = [(s["clap"] - mc) / sc + (s["aes"] - ma) / sa for s in scores[:3]]  # the axes weigh 0
    d = P.choose(scores, stats, P.PairRule())
    assert d.combined[:3] == pytest.approx(want) and d.combined[3] is None
    assert (d.chosen, d.rejected) == (int(np.argmax(want)), int(np.argmin(want))) == (2, 0)
    assert d.skip is None and d.margin == pytest.approx(max(want) - min(want))
    # A weight moves the choice: AES alone prefers candidate 1, and dislikes candidate 0.
    d = P.choose(scores, stats, P.PairRule(weights={"clap": 0.0}))
    assert (d.chosen, d.rejected) == (1, 0)
    # Axes can be weighed in.
    d = P.choose(scores, stats, P.PairRule(weights={"clap": 0, "aes": 0, "aes_pq": 1}))
    assert (d.chosen, d.rejected) == (1, 0)


def test_rule_thresholds_and_ties_skip_with_reasons():
    scores = [{"clap": 0.2}, {"clap": 0.3}, {"clap": 0.1}]
    stats = P.metric_stats(scores)
    margin = 0.2 / stats["clap"][1]
    assert P.choose(scores, stats, P.PairRule(min_margin=margin - 1e-6)).skip is None
    d = P.choose(scores, stats, P.PairRule(min_margin=margin + 1e-6))
    assert d.skip == "margin" and "--min-margin" in d.detail
    d = P.choose(scores, stats, P.PairRule(min_chosen={"clap": 0.35}))
    assert d.skip == "chosen_score" and "clap 0.3" in d.detail
    assert P.choose(scores, stats, P.PairRule(min_chosen={"clap": 0.3, P.COMBINED: 1.0})).skip is None
    assert P.choose(scores, stats, P.PairRule(min_chosen={P.COMBINED: 1.3})).skip == "chosen_score"
    assert P.choose([{"clap": 0.2}, None], stats, P.PairRule()).skip == "few_valid"
    same = [{"clap": 0.5}, {"clap": 0.5}]
    d = P.choose(same, P.metric_stats(same), P.PairRule())
    assert d.skip == "tie" and d.margin == 0  # no spread: the metric counts 0 for everyone
    # Ties between the best (or worst) go to the earlier candidate.
    tied = [{"clap": 0.1}, {"clap": 0.3}, {"clap": 0.3}, {"clap": 0.1}]
    d = P.choose(tied, P.metric_stats(tied), P.PairRule())
    assert (d.chosen, d.rejected) == (1, 0)


def test_rule_refuses_unknown_metrics():
    with pytest.raises(ValueError, match="--weight names clip, but the scorers return aes, clap"):
        P.PairRule(weights={"clip": 1}).check(["clap", "aes"])
    with pytest.raises(ValueError, match="--min-chosen-score names aes"):
        P.PairRule(min_chosen={"aes": 5}).check(["clap"])
    with pytest.raises(ValueError, match="weight 0"):
        P.PairRule(weights={"clap": 0}).check(["clap"])
    P.PairRule(min_chosen={P.COMBINED: 0}).check(["clap"])


# ---------------------------------------------------------------------------------------------
# The journal and the prompt records.

def test_journal_cuts_a_torn_line_and_reads_across_tasks(tmp_path):
    j = jobs.Journal(str(tmp_path / "candidates.jsonl"))
    j.append({"index": 0, "id": "a"})
    j.append({"index": 1, "id": "b"})
    with open(j.path, "ab") as f:
        f.write(b'{"index": 2, "id": "c", "candi')  # killed mid-write
    (tmp_path / "candidates.task-00001-of-00002.jsonl").write_text('{"index": 3, "id": "d"}\n')
    (tmp_path / "candidates_old.jsonl").write_text("not a journal\n")
    assert sorted(jobs.read_journals(str(tmp_path), "candidates")) == [0, 1, 3]  # the torn line is ignored
    j.repair()
    j.append({"index": 2, "id": "c"})
    assert [json.loads(x)["index"] for x in open(j.path)] == [0, 1, 2]
    (tmp_path / "candidates.jsonl").write_text('{"index": 0}\n{"ind\n{"index": 2}\n')
    with pytest.raises(ValueError, match=r"candidates.jsonl:2 is not a complete record"):
        jobs.read_journals(str(tmp_path), "candidates")


def test_run_settings_lock_the_folder_once_work_is_done(tmp_path):
    out = str(tmp_path)
    jobs.check_run(out, {"seed": 1, "scorers": [("clap", "/m")]})
    jobs.check_run(out, {"seed": 1, "scorers": [["clap", "/m"]]})  # as stored
    jobs.check_run(out, {"seed": 2}, started=False)  # nothing done yet (e.g. the first run failed to load its model)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(seed differ"):
        jobs.check_run(out, {"seed": 3})


def test_prompt_records_cut_chat_and_reason_records(tmp_path, audio_dir):
    rich = {"keywords": ["rain"], "layout": "rain", "description": "rain on a roof"}
    lines = [
        {"prompt": "rain on a roof"},
        {"id": "chat", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a dog"},
                                    {"role": "assistant", "codes": [[1, 2]] * 8}]},
        {"id": "reason", "kind": "enrichment", "prompt": "rain", "rich_caption": rich, "codes": [[1]] * 8},
        {"id": "und", "prompt": [{"role": "user", "audio": "wav1.wav", "start": 0.1, "end": 0.4},
                                 {"role": "user", "content": "what is it"}], "score_text": "a tone"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = P.read_prompts([str(path)], "audio", audio_dir)
    assert [r.id for r in recs] == ["000000", "chat", "reason", "und"]
    assert recs[0].messages == [{"role": "user", "content": "rain on a roof"}] and recs[0].score_text == "rain on a roof"
    assert [m["role"] for m in recs[1].messages] == ["system", "user"]
    # audio mode keeps the plan in the prompt (and CLAP reads it); plan mode stops before it
    assert [t.part for t in recs[2].turns] == ["system", "prompt", "plan"] and recs[2].score_text.startswith("Keywords")
    assert [t.part for t in P.read_prompts([str(path)], "plan", audio_dir)[2].turns] == ["system", "prompt"]
    assert recs[3].messages[0] == {"role": "user", "audio": os.path.join(audio_dir, "wav1.wav"), "start": 0.1,
                                   "end": 0.4}
    assert recs[3].score_text == "a tone"


@pytest.mark.parametrize("line, mode, message", [
    ({"text": "x"}, "audio", r'prompts.jsonl:2: needs "prompt"'),
    ({"prompt": [{"role": "user", "audio": "missing.wav"}]}, "audio", r"prompts.jsonl:2: field 'prompt\[0\].audio': audio file .*missing.wav does not exist"),
    ({"prompt": "a dog"}, "text", r"prompts.jsonl:1: field 'prompt': has no audio-in message"),
    ({"id": "a", "prompt": "again"}, "audio", r"prompts.jsonl:2: id 'a' is also the id of .*prompts.jsonl:1"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "audio", r"prompts.jsonl:2: field 'messages': has no user or system message"),
])
def test_bad_prompt_records_are_named(tmp_path, line, mode, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message):
        P.read_prompts([str(path)], mode)


# ---------------------------------------------------------------------------------------------
# The tool end to end.

NUM_PROMPTS = 6


class RMSScorer(Scorer):
    """A plug-in scorer (``tests.posttraining.test_pairs:RMSScorer=PATH``): each clip's RMS level."""

    name = "rms"

    def __init__(self, path, device=None):
        assert os.path.exists(path)

    def score(self, waves, sample_rate, texts=None):
        return {"rms": np.array([float(np.sqrt(np.mean(np.square(w)))) for w in waves])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_path, codec_dir, audio_dir):
    from megatron_ualm.tiny import backbones as tiny_models

    root = tmp_path_factory.mktemp("pairs")
    prompts = root / "prompts.jsonl"
    words = ["rain on a tin roof", "a dog barks twice", "wind in the trees", "a bell rings", "water drips",
             "a car horn"]
    rich = {"keywords": ["dog"], "layout": "two barks", "description": "a dog barks twice"}
    lines = [{"id": f"p{i}", "prompt": w} for i, w in enumerate(words[:NUM_PROMPTS - 1])]
    lines.append({"id": "reason", "kind": "enrichment", "prompt": "dog", "rich_caption": rich, "audio": "wav0.wav"})
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["--prompts", str(prompts), "--audio-root", audio_dir, "--random-init", "--flavor", "debug",
            "--tokenizer", tokenizer_path, "--codec", codec_dir, "--scorer", f"clap={tiny_models.write_tiny_clap(root / 'clap')}",
            "--scorer", f"aesthetics={tiny_models.write_tiny_aesthetics(root / 'aes')}",
            "--scorer", f"tests.posttraining.test_pairs:RMSScorer={root}", "--num-candidates", "3",
            "--batch-size", "1", "--max-audio-seconds", "0.3", "--min-audio-seconds", "0.1", "--seed", "5"]
    return {"root": root, "args": args}


def _env():  # the plug-in scorer is this module: importable from the repository root (and its imports)
    return child_env(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def _run(cmd, timeout=600):
    return run_ok(cmd, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run with TP=2 (every rank decodes, the first scores and writes)."""
    out = str(setup["root"] / "tp2")
    log = _run([*torchrun(2, TOOL), *setup["args"], "--tensor-model-parallel-size", "2", "--out", out, "--no-progress"])
    assert f"{NUM_PROMPTS} pairs from {NUM_PROMPTS} prompts" in log
    return out


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_manifests(setup, reference):
    out = str(setup["root"] / "killed")
    journal = os.path.join(out, "candidates.jsonl")
    proc = subprocess.Popen([sys.executable, TOOL, *setup["args"], "--out", out, "--no-progress"], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(journal) and open(journal, "rb").read().count(b"\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    done = len(jobs.read_journals(out, P.JOURNAL))
    assert 1 <= done < NUM_PROMPTS, f"the kill came too late ({done} prompts done)"
    assert not os.path.exists(os.path.join(out, "pairs.jsonl"))
    with open(journal, "ab") as f:  # as if killed in the middle of the next line
        f.write(b'{"index": 5, "id": "reason", "candidates": [{"fra')
    (setup["root"] / "killed" / "codes" / "0000004.npz.99.partial.npz").write_bytes(b"torn")

    log = _run([sys.executable, TOOL, *setup["args"], "--out", out])
    assert f"{NUM_PROMPTS} pairs from {NUM_PROMPTS} prompts" in log
    assert f"{done}/{NUM_PROMPTS} [" in log and f"{NUM_PROMPTS}/{NUM_PROMPTS} [" in log  # progress: total, ETA
    for name in ("pairs.jsonl", "adaptation.jsonl", "skipped.jsonl", "summary.json"):
        with open(os.path.join(out, name)) as a, open(os.path.join(reference, name)) as b:
            assert a.read() == b.read(), name
    assert sorted(x["index"] for x in _lines(journal)) == list(range(NUM_PROMPTS))

    # A rerun has nothing to decode (and loads no model); other settings are refused.
    log = _run([sys.executable, TOOL, *setup["args"], "--out", out])
    assert f"{NUM_PROMPTS} pairs" in log and "Loading weights" not in log
    settings = json.load(open(os.path.join(out, "run.json")))["settings"]
    jobs.check_run(out, settings)
    with pytest.raises(ValueError, match=r"holds a run with other settings \(num_candidates differ; see"):
        jobs.check_run(out, {**settings, "num_candidates": 4})


@pytest.mark.slow  # the TP=2 reference run
def test_manifests_hold_every_score_and_follow_the_rule(setup, reference):
    pairs = _lines(os.path.join(reference, "pairs.jsonl"))
    journal = jobs.read_journals(reference, P.JOURNAL)
    assert [p["id"] for p in pairs] == [f"p{i}" for i in range(NUM_PROMPTS - 1)] + ["reason"]
    stats = P.metric_stats([e.get("scores") for j in journal.values() for e in j["candidates"]])
    assert set(stats) == {"clap", "aes", *P.AES_AXES, "rms"}
    by_id = {j["id"]: j for j in journal.values()}
    for p in pairs:
        entries = by_id[p["id"]]["candidates"]
        assert len(p["candidates"]) == 3 and all(set(c["scores"]) == set(stats) for c in p["candidates"])
        d = P.choose([e.get("scores") for e in entries], stats, P.PairRule())
        assert (p["chosen_index"], p["rejected_index"]) == (d.chosen, d.rejected)
        assert p["margin"] > 0
        assert p["scores"]["chosen"][P.COMBINED] - p["scores"]["rejected"][P.COMBINED] == pytest.approx(p["margin"])
        with np.load(os.path.join(reference, by_id[p["id"]]["codes"])) as z:
            assert p["chosen"]["codes"] == z[f"c{d.chosen}"].tolist()
            assert z[f"c{d.chosen}"].shape[0] == 8 and 5 <= z[f"c{d.chosen}"].shape[1] <= 15
    reason = pairs[-1]
    assert [m["role"] for m in reason["prompt"]] == ["system", "user", "assistant"]  # the plan stays in the prompt
    adaptation = _lines(os.path.join(reference, "adaptation.jsonl"))
    assert adaptation[0]["messages"] == [{"role": "user", "content": "rain on a tin roof", "loss": False},
                                         {"role": "assistant", "codes": pairs[0]["chosen"]["codes"]}]
    summary = json.load(open(os.path.join(reference, "summary.json")))
    assert summary["pairs"] == NUM_PROMPTS and summary["metrics"]["aes_ce"]["weight"] == 0
    assert summary["metrics"]["rms"]["weight"] == 1 and summary["metrics"]["rms"]["std"] > 0  # the plug-in counts


@pytest.mark.slow  # the TP=2 reference run
def test_thresholds_rerun_the_rule_without_decoding(setup, reference, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    records = P.read_prompts([setup["args"][1]], "audio", setup["args"][3])
    summary = P.finalize(out, records, "audio", P.PairRule(min_margin=2.0, min_chosen={"clap": -1.0}))
    margins = sorted(p["margin"] for p in _lines(os.path.join(reference, "pairs.jsonl")))
    kept = sum(m >= 2.0 for m in margins)
    assert summary["pairs"] == kept and summary["skipped"]["margin"] == NUM_PROMPTS - kept
    skipped = _lines(os.path.join(out, "skipped.jsonl"))
    assert len(skipped) == NUM_PROMPTS - kept and all(s["reason"] == "margin" for s in skipped)
    assert len(_lines(os.path.join(out, "adaptation.jsonl"))) == kept


@pytest.mark.slow  # the TP=2 reference run
def test_outputs_feed_the_data_tools_without_rejections(reference, tmp_path, tokenizer_path, codec_dir):
    from megatron_ualm.data.shards import ShardReader
    from megatron_ualm.data.cli import preprocess_chat_main, preprocess_preferences_main

    common = ["--tokenizer", tokenizer_path, "--codec-path", codec_dir, "--flavor", "debug", "--no-progress"]
    for tool, manifest, name in ((preprocess_preferences_main, "pairs.jsonl", "preference"),
                                 (preprocess_chat_main, "adaptation.jsonl", "chat")):
        out = str(tmp_path / name)
        assert tool(["--input", os.path.join(reference, manifest), "--output", out, *common]) == 0
        task = json.load(open(os.path.join(out, f"{name}.task-00000-of-00001.json")))
        assert task["counts"]["samples"] == NUM_PROMPTS and task["counts"]["rejected"] == 0
        assert len(ShardReader(os.path.join(out, f"{name}-00000"))) == NUM_PROMPTS


def test_help_and_bad_flags_answer_in_one_line(tmp_path, tokenizer_path):
    proc = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--min-chosen-score" in proc.stdout and "Rule." in proc.stdout
    base = [sys.executable, TOOL, "--prompts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"),
            "--random-init", "--flavor", "debug", "--tokenizer", tokenizer_path, "--codec", str(tmp_path)]
    for extra, message in ((["--scorer", "clap=/no/such/dir"], "--scorer clap=/no/such/dir: /no/such/dir does not exist"),
                           (["--scorer", "clap"], "give SPEC=PATH"),
                           (["--scorer", f"clap={tmp_path}", "--num-candidates", "1"], "--num-candidates must be >= 2"),
                           (["--scorer", f"clap={tmp_path}"], "--prompts " + str(tmp_path / "nope.jsonl") + " does not exist")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
