"""MMAU / MMAR-format scoring: answer parsing on tricky replies, accuracy on a set with a known
answer, record checks; and the understanding / text tasks end to end on the random debug model."""

import json
import os
import subprocess
import sys

import pytest

from megatron_ualm.evaluation.text import final_answer, score_exact_match
from megatron_ualm.evaluation.understanding import MCRecord, gold_index, parse_choice, read_records, score_responses

CHOICES = ["dog barking", "dog", "car engine", "rain"]

# (reply, expected index or None)
TRICKY = [
    ("B", 1), ("b", 1), ("(B)", 1), ("B.", 1), ("**C**", 2), ("[D]", 3), (" C) ", 2),
    ("The answer is (C).", 2), ("Answer: D", 3), ("answer: b", 1), ("I choose option C because of the engine.", 2),
    ("(A) dog barking", 0), ("C. car engine", 2), ("C: the car", 2),
    ("dog barking", 0), ("Dog.", 1), ("It is a dog barking in the distance.", 0),
    ("I hear rain on a roof.", 3), ("A dog is barking loudly", 1),  # only "dog" occurs verbatim
    ("A", 0), ("A car engine revs", 2),
    ("Either (A) or (B).", None), ("E", None), ("", None), ("no idea", None),
    ("The sound is clearly C", 2), ("It could be the dog or the rain", None),
]


@pytest.mark.parametrize("reply,expected", TRICKY)
def test_parse_choice(reply, expected):
    assert parse_choice(reply, CHOICES) == expected


def test_gold_answer_forms():
    assert gold_index("dog", CHOICES) == 1 and gold_index("Car Engine", CHOICES) == 2
    assert gold_index("(D)", CHOICES) == 3 and gold_index("b", CHOICES) == 1 and gold_index(0, CHOICES) == 0
    assert gold_index("E", CHOICES) is None and gold_index(7, CHOICES) is None and gold_index(True, CHOICES) is None


def test_accuracy_on_a_set_with_a_known_answer():
    recs = [MCRecord("1", "q", CHOICES, 0, "sound"), MCRecord("2", "q", CHOICES, 2, "sound"),
            MCRecord("3", "q", ["piano", "guitar"], 1, "music"), MCRecord("4", "q", ["piano", "guitar"], 0, "music"),
            MCRecord("5", "q", ["yes", "no"], 0, "speech")]
    replies = ["(A)", "The answer is B", "guitar", "I cannot tell", "A"]
    summary, rows = score_responses(recs, replies)
    assert summary["accuracy"] == pytest.approx(3 / 5) and summary["unparsed"] == 1
    assert summary["per_category"] == {"music": {"accuracy": 0.5, "num_questions": 2},
                                       "sound": {"accuracy": 0.5, "num_questions": 2},
                                       "speech": {"accuracy": 1.0, "num_questions": 1}}
    assert [r["response"] for r in rows] == replies and [r["parsed"] for r in rows] == ["A", "B", "B", None, "A"]


def test_read_records_names_file_line_and_field(tmp_path):
    good = {"id": "q1", "audio": "a.wav", "question": "What?", "choices": ["x", "y"], "answer": "y", "task": "sound"}
    p = tmp_path / "mmau.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "z"}) + "\n")
    with pytest.raises(ValueError, match=r'mmau.jsonl:2: "answer" \'z\' is none of the choices'):
        read_records(str(p))
    p.write_text(json.dumps(good) + "\n")
    rec = read_records(str(p))[0]
    assert rec.answer == 1 and rec.category == "sound" and rec.audio == str(tmp_path / "a.wav")
    p.write_text(json.dumps({**good, "choices": "x"}) + "\n")
    with pytest.raises(ValueError, match=r'mmau.jsonl:1: "choices" must be a list'):
        read_records(str(p))
    p.write_text("[" + json.dumps(good) + "]")  # MMAU ships a JSON list
    assert read_records(str(p))[0].id == "q1"


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7.\n#### 7", "7"), ("The total is $1,250.", "1250"), ("\\boxed{42}", "42"),
    ("#### 3.50", "3.5"), ("x = 2, then 10.0", "10"), ("no number", None), ("#### -4", "-4"),
])
def test_gsm8k_final_answer(text, expected):
    assert final_answer(text) == expected


def test_exact_match():
    summary, rows = score_exact_match([{"id": "1", "gold": "7"}, {"id": "2", "gold": "12"}], ["#### 7", "it is 13"])
    assert summary["exact_match"] == 0.5 and [r["predicted"] for r in rows] == ["7", "13"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = "what is the sound a dog cat car rain answer with option letter A B C D yes no of 1 2 3 4 5 6 7 8 9 0 + =".split()
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)] * 20, trainers.BpeTrainer(vocab_size=150, special_tokens=["[UNK]"],
                                                                        show_progress=False))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def _run(args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_ualm.evaluate", *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_understanding_and_text_tasks_end_to_end(tmp_path, tokenizer_path):
    """The random debug model hears each clip and answers; every raw reply is saved and scored."""
    from megatron_ualm.tiny import backbones as tiny_models

    tiny_models.write_clips(tmp_path / "clips", ["a", "b"], seconds=0.5)
    recs = [{"id": "a", "audio": "clips/a.wav", "question": "what is the sound", "choices": ["dog", "cat", "car"],
             "answer": "A", "category": "sound"},
            {"id": "b", "audio": "clips/b.wav", "question": "what is the sound", "choices": ["yes", "no"],
             "answer": "no", "category": "music"}]
    (tmp_path / "mmau.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    model = ["--random-init", "--flavor", "debug", "--tokenizer", tokenizer_path, "--batch-size", "2"]
    _run(["understanding", "--data", str(tmp_path / "mmau.jsonl"), "--out", str(tmp_path / "u"), "--max-new-tokens", "4", *model])
    rows = [json.loads(x) for x in (tmp_path / "u" / "responses.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(isinstance(r["response"], str) for r in rows)
    res = json.loads((tmp_path / "u" / "results.json").read_text())
    assert res["num_questions"] == 2 and set(res["per_category"]) == {"sound", "music"}
    assert res["accuracy"] == sum(r["correct"] for r in rows) / 2

    (tmp_path / "mmlu.jsonl").write_text(json.dumps({"question": "1 + 1 =", "choices": ["1", "2", "3", "4"], "answer": 1,
                                                     "subject": "math"}) + "\n")
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "what is 3 + 4", "answer": "3 + 4 = 7\n#### 7"}) + "\n")
    _run(["text", "--mmlu", str(tmp_path / "mmlu.jsonl"), "--gsm8k", str(tmp_path / "gsm8k.jsonl"),
          "--out", str(tmp_path / "t"), "--max-new-tokens", "4", *model])
    res = json.loads((tmp_path / "t" / "results.json").read_text())
    assert res["mmlu"]["num_questions"] == 1 and res["gsm8k"]["num_questions"] == 1
    assert 0.0 <= res["mmlu"]["accuracy"] <= 1.0
    assert "| UALM |" in (tmp_path / "t" / "results.md").read_text()
