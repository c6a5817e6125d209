"""Audio understanding benchmarks in the MMAU / MMAR format: multiple-choice questions about a
clip, scored by accuracy overall and per category.

A record (one JSON object per line)::

    {"id": "q1", "audio": "clips/q1.wav", "question": "What is making the sound?",
     "choices": ["a dog", "a cat", "a car", "rain"], "answer": "a dog", "category": "sound"}

``audio`` is relative to the JSONL file's folder (or absolute); ``answer`` is the text of the
right choice, its letter (``"A"``, ``"(A)"``) or its 0-based index; ``category`` is optional
(MMAU's ``task`` or MMLU's ``subject`` field is read when ``category`` is absent; the text
benchmarks read the same format without ``audio``). The model hears the clip and reads
the question with lettered choices; its reply is parsed by ``parse_choice``.
"""

from __future__ import annotations

import os
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

LETTERS = string.ascii_uppercase


@dataclass
class MCRecord:
    """One multiple-choice question."""

    id: str
    question: str
    choices: list
    answer: int  # index of the right choice
    category: str = "all"
    audio: Optional[str] = None
    extra: dict = field(default_factory=dict)


def _norm(text: str) -> str:
    """Lower case, markdown emphasis and punctuation dropped, whitespace collapsed."""
    text = text.lower().replace("*", " ").replace("_", " ")
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def gold_index(answer, choices: Sequence[str]) -> Optional[int]:
    """The index a record's ``answer`` field names: an int, a choice's text, or a letter."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    if not isinstance(answer, str):
        return None
    normed = [_norm(c) for c in choices]
    if _norm(answer) in normed:
        return normed.index(_norm(answer))
    m = re.fullmatch(r"\s*\(?([A-Za-z])[\).:]?\s*", answer)
    if m and LETTERS.index(m.group(1).upper()) < len(choices):
        return LETTERS.index(m.group(1).upper())
    return None


def parse_choice(response: str, choices: Sequence[str]) -> Optional[int]:
    """Which choice a free-text reply picks, or None when it picks none or several.

    In order: a reply that is only a letter (``B``, ``(B)``, ``b.``, ``**B**``); an explicit
    "answer is B" / "answer: (B)" / "option B"; exactly one distinct parenthesised letter ``(B)``;
    a leading ``B.`` / ``B)`` / ``B:``; exactly one distinct standalone capital letter that is not
    the article "A" (``A`` followed by a lower-case word); the text of a choice (an exact match
    first, else the choices whose text occurs in the reply, keeping the longest when one contains
    the others).
    """
    n = len(choices)
    valid = LETTERS[:n]
    text = response.strip().replace("*", "").replace("`", "")

    def pick(letter: str) -> Optional[int]:
        letter = letter.upper()
        return LETTERS.index(letter) if letter in valid else None

    m = re.fullmatch(r"[\(\[]?\s*([A-Za-z])\s*[\)\]]?[.:]?", text)
    if m:
        return pick(m.group(1))
    m = re.search(r"(?:answer|option|choice)\s*(?:is|:)?\s*(?:option\s*)?[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])", text,
                  flags=re.IGNORECASE)
    if m and pick(m.group(1)) is not None:
        return pick(m.group(1))
    paren = {x.upper() for x in re.findall(r"\(([A-Za-z])\)", text)} & set(valid)
    if len(paren) == 1:
        return pick(paren.pop())
    m = re.match(r"([A-Z])\s*[\).:](?:\s|$)", text)
    if m and pick(m.group(1)) is not None:
        return pick(m.group(1))
    standalone = {x for x in re.findall(r"(?<![\w'])([A-Z])(?![\w'])(?!\s+[a-z])", text)} & set(valid)
    if len(standalone) == 1:
        return pick(standalone.pop())
    reply = _norm(text)
    normed = [_norm(c) for c in choices]
    if reply in normed:
        return normed.index(reply)
    found = [i for i, c in enumerate(normed) if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", reply)]
    found = [i for i in found if not any(j != i and normed[i] in normed[j] for j in found)]
    if len(found) == 1:
        return found[0]
    return None


def read_records(path: str) -> list[MCRecord]:
    """MMAU / MMAR-format records from a JSONL (or a JSON list) file; errors name file, line, field."""
    from megatron_ualm.files import read_jsonl

    folder = os.path.dirname(os.path.abspath(path))
    items = read_jsonl(path)
    out = []
    for n, rec in items:
        where = f"{path}:{n}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: a record must be a JSON object")
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f'{where}: "choices" must be a list of at least two strings, e.g. ["a dog", "a cat"]')
        if len(choices) > len(LETTERS):
            raise ValueError(f'{where}: "choices" has {len(choices)} entries; at most {len(LETTERS)} are lettered')
        if not isinstance(rec.get("question"), str):
            raise ValueError(f'{where}: "question" must be a string')
        gold = gold_index(rec.get("answer"), choices)
        if gold is None:
            raise ValueError(f'{where}: "answer" {rec.get("answer")!r} is none of the choices: give the text of one '
                             f'choice, its letter (A-{LETTERS[len(choices) - 1]}) or its 0-based index')
        audio = rec.get("audio", rec.get("audio_path"))
        if audio is not None:
            audio = audio if os.path.isabs(audio) else os.path.join(folder, audio)
        rid = str(rec.get("id", n))
        category = str(rec.get("category", rec.get("task", rec.get("subject", "all"))))
        out.append(MCRecord(rid, rec["question"], choices, gold, category, audio,
                            {k: v for k, v in rec.items() if k not in ("question", "choices", "answer", "audio")}))
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def question_text(rec: MCRecord, instruction: str = "Answer with the option's letter from the given choices directly.") -> str:
    """The question with lettered choices, as the model reads it."""
    lines = [rec.question.strip()] + [f"({LETTERS[i]}) {c}" for i, c in enumerate(rec.choices)]
    return "\n".join(lines + [instruction])


def score_responses(records: Sequence[MCRecord], responses: Sequence[str]) -> tuple[dict, list[dict]]:
    """Accuracy overall and per category, and one row per question.

    Args:
        records: the questions.
        responses: the model's raw reply to each, in order.

    Returns:
        ``(summary, rows)``: summary holds ``accuracy``, ``num_questions``, ``unparsed`` (replies
        that picked no single choice; they count as wrong) and ``per_category``
        ``{category: {"accuracy", "num_questions"}}``; rows hold each question's id, category,
        choices, answer, raw response, parsed letter and correctness.
    """
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} questions but {len(responses)} responses")
    per_cat: dict = defaultdict(lambda: [0, 0])
    rows, unparsed, correct = [], 0, 0
    for rec, resp in zip(records, responses):
        picked = parse_choice(resp, rec.choices)
        ok = picked == rec.answer
        unparsed += picked is None
        correct += ok
        per_cat[rec.category][0] += ok
        per_cat[rec.category][1] += 1
        rows.append({"id": rec.id, "category": rec.category, "question": rec.question, "choices": rec.choices,
                     "answer": LETTERS[rec.answer], "response": resp,
                     "parsed": None if picked is None else LETTERS[picked], "correct": bool(ok)})
    n = len(records)
    summary = {
        "accuracy": correct / n if n else float("nan"),
        "num_questions": n,
        "unparsed": unparsed,
        "per_category": {c: {"accuracy": k / m, "num_questions": m} for c, (k, m) in sorted(per_cat.items())},
    }
    return summary, rows
