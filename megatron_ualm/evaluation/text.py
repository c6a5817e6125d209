"""Text benchmarks on local JSONL files, run on the Megatron model itself.

- **Multiple choice by log-likelihood** (MMLU format: ``question``, ``choices``, ``answer`` as
  index / letter / text, optional ``subject``): the model reads the question with lettered
  choices and ``Answer:``; the choice whose letter has the highest log-probability as the first
  token of the reply wins (lm-eval's MMLU scores the same single-token continuation).
- **Exact match after generation** (GSM8K format: ``question``, ``answer`` whose final number
  follows ``####``): greedy decoding, then the reply's final answer (after ``####``, in
  ``\\boxed{}``, else its last number) is compared with the gold number.

For everything else, export the checkpoint to Hugging Face (``python -m megatron_ualm.conversion
export``) and run ``lm-eval`` on it (README, "Evaluation").
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from megatron_ualm.evaluation.understanding import LETTERS, MCRecord

MC_INSTRUCTION = "Answer:"
GSM8K_INSTRUCTION = "Solve the problem step by step, then give the final number after '####'."
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def letter_token_ids(tokenizer, n: int) -> list[int]:
    """The token id of each choice letter ``A``, ``B``, ... as the first token of a reply."""
    ids = []
    for letter in LETTERS[:n]:
        tok = tokenizer.encode(letter)
        if len(tok) != 1:
            raise ValueError(f"the tokenizer splits the choice letter {letter!r} into {len(tok)} tokens; "
                             "log-likelihood multiple choice needs one token per letter")
        ids.append(tok[0])
    return ids


def mc_prompt(rec: MCRecord) -> str:
    """MMLU's layout: the question, ``A. choice`` lines, ``Answer:``."""
    return "\n".join([rec.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(rec.choices)] + [MC_INSTRUCTION])


def score_multiple_choice(records: Sequence[MCRecord], logits: Sequence[torch.Tensor], letter_ids: Sequence[int]) -> tuple[dict, list]:
    """Accuracy of the argmax over the choice letters' log-probabilities.

    Args:
        records: the questions.
        logits: first-token text logits ``[V]`` of each reply.
        letter_ids: token id of each letter.

    Returns:
        ``(summary, rows)`` with ``accuracy``, ``num_questions`` and ``per_category``.
    """
    rows, per_cat = [], {}
    for rec, lg in zip(records, logits):
        logp = torch.log_softmax(lg.double(), dim=-1)[list(letter_ids[:len(rec.choices)])]
        picked = int(logp.argmax())
        ok = picked == rec.answer
        per_cat.setdefault(rec.category, [0, 0])
        per_cat[rec.category][0] += ok
        per_cat[rec.category][1] += 1
        rows.append({"id": rec.id, "category": rec.category, "answer": LETTERS[rec.answer], "picked": LETTERS[picked],
                     "correct": bool(ok), "logprobs": [round(float(x), 6) for x in logp]})
    n = len(rows)
    return {"accuracy": sum(r["correct"] for r in rows) / n if n else float("nan"), "num_questions": n,
            "per_category": {c: {"accuracy": k / m, "num_questions": m} for c, (k, m) in sorted(per_cat.items())}}, rows


def _number(text: str) -> Optional[str]:
    text = text.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        v = float(text)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def final_answer(text: str) -> Optional[str]:
    """The final number of a GSM8K-style solution: after the last ``####``, else in the last
    ``\\boxed{}``, else the last number in the text; normalised (no commas / $, ``7.0`` -> ``7``)."""
    m = re.findall(rf"####\s*({_NUMBER})", text)
    if not m:
        m = re.findall(rf"\\boxed\{{\s*({_NUMBER})\s*\}}", text)
    if not m:
        m = re.findall(_NUMBER, text)
    return _number(m[-1]) if m else None


def read_gsm8k(path: str) -> list[dict]:
    """GSM8K-format records ``{"question", "answer"}`` (the gold number after ``####``)."""
    from megatron_ualm.files import read_jsonl

    out = []
    for n, rec in read_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise ValueError(f'{path}:{n}: needs a "question" string')
        gold = final_answer(str(rec.get("answer", "")))
        if gold is None:
            raise ValueError(f'{path}:{n}: "answer" holds no number (GSM8K puts it after "####", e.g. "... #### 42")')
        out.append({"id": str(rec.get("id", n)), "question": rec["question"], "gold": gold})
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def score_exact_match(records: Sequence[dict], responses: Sequence[str]) -> tuple[dict, list]:
    """Exact match of each reply's final number with the gold number."""
    rows = []
    for rec, resp in zip(records, responses):
        pred = final_answer(resp)
        rows.append({"id": rec["id"], "gold": rec["gold"], "predicted": pred, "correct": pred == rec["gold"],
                     "response": resp})
    n = len(rows)
    return {"exact_match": sum(r["correct"] for r in rows) / n if n else float("nan"), "num_questions": n}, rows
