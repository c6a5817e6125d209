"""Preference pairs from the model's own generations (``tools/make_preference_pairs.py``).

For every prompt the model writes N candidates (batched, classifier-free guidance, any TP / PP),
one or more scorers rate each candidate (``evaluation.scorers``: CLAP, AudioBox-Aesthetics, or a
plug-in), and a rule picks the chosen and the rejected response. Outputs in ``--out``::

    pairs.jsonl        the preference manifest (tools/preprocess_preferences.py): id, prompt,
                       chosen, rejected, margin, and every candidate's scores
    adaptation.jsonl   the winners as an SFT chat manifest (tools/preprocess_chat.py): UALM-Gen's
                       adaptation step, plain cross-entropy on the model's own best generations
                       (loss on the generated reply only)
    skipped.jsonl      the prompts without a pair, and why
    summary.json       counts, per-metric statistics and weights, the rule's settings
    candidates.jsonl   the completion records: one line per finished prompt with every
                       candidate (text, frames, raw scores); candidates.task-I-of-N.jsonl per task
    codes/             each prompt's candidate codes (.npz); audio/ the WAVs (--audio-format wav)

**Modes** (``--mode``): ``audio`` (default) -- the reply is one audio message; ``plan`` -- a
text plan (rich caption) then audio conditioned on it, both in the response; ``text`` -- a text
reply, scored against the prompt's audio-in clip (e.g. CLAP audio-caption similarity, for
understanding pairs). Audio candidates are stored as the codes the model wrote (exact; the
default) or as WAVs the data tools re-encode (``--audio-format wav``).

**Rule.** (1) Each metric is standardised over every valid candidate of the run, z = (s - mean)
/ std (a metric without spread counts 0), so metrics on different scales (CLAP cosine, AES on
1-10) combine with comparable weights. (2) A candidate's combined score is the weighted sum of
its z-scores (``--weight METRIC=W``; default 1 for ``clap``, ``aes`` and every plug-in metric,
0 for the four aesthetics axes ``aes_ce/cu/pc/pq`` whose mean is ``aes``). (3) Chosen = the
highest combined score, rejected = the lowest (ties: the earlier candidate). (4) A prompt is
skipped, and counted by reason, when fewer than two candidates are valid (no audio, empty
text), when the margin (combined chosen - combined rejected) is 0 or below ``--min-margin``,
when the chosen candidate scores below ``--min-chosen-score METRIC=V`` (a raw metric or
``combined``), or when chosen and rejected are the same response. The rule runs when every
prompt is done, over the stored scores, so rerunning with other weights or thresholds re-decides
without generating anything.

**Resume.** Prompts are decoded in fixed groups of ``--batch-size`` prompts (group k seeded
with ``--seed + k``), so a group's candidates do not depend on what ran before. A finished
prompt's codes (and WAVs) are written under temporary names and renamed, then its line is
appended to the journal and flushed; a kill leaves at most a torn last line, cut off on the next
run, and the unfinished group is decoded again with the same result. Rerunning the same command
skips finished prompts; the manifests are written (temporary name, rename) once all prompts are
done. ``run.json`` holds the settings that make candidates: a rerun with other ones is refused.

**Parallelism.** Every rank of a model-parallel group (TP x PP) decodes the same batches; its
first rank scores and writes. Data-parallel replicas (world size > TP x PP) and
``--num-tasks`` / ``--task-index`` (default: a Slurm array) share the groups: group k belongs to
task k mod N. The last task to finish writes the manifests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from megatron_ualm.files import atomic_write, jsonl_text
from megatron_ualm.launch import program_name
from megatron_ualm.posttraining import jobs
from megatron_ualm.progress import progress_bar

MODES = ("audio", "plan", "text")
AES_AXES = ("aes_ce", "aes_cu", "aes_pc", "aes_pq")
DEFAULT_WEIGHTS = {"clap": 1.0, "aes": 1.0, **{a: 0.0 for a in AES_AXES}}
"""Weights of the built-in scorers' metrics; any other (plug-in) metric weighs 1."""

COMBINED = "combined"
JOURNAL = "candidates"
SKIP_REASONS = {
    "few_valid": "fewer than 2 valid candidates",
    "tie": "no score difference between the candidates",
    "margin": "margin below --min-margin",
    "chosen_score": "chosen below --min-chosen-score",
    "identical": "chosen and rejected are the same response",
}


# ---------------------------------------------------------------------------------------------
# The rule.

@dataclass(frozen=True)
class PairRule:
    """How chosen and rejected are picked (module docstring, "Rule").

    Attributes:
        weights: per-metric weight overrides (others: ``DEFAULT_WEIGHTS``, else 1).
        min_margin: smallest combined-score margin a pair may have.
        min_chosen: ``{metric or "combined": value}`` the chosen candidate must reach.
    """

    weights: Mapping[str, float] = field(default_factory=dict)
    min_margin: float = 0.0
    min_chosen: Mapping[str, float] = field(default_factory=dict)

    def weight(self, metric: str) -> float:
        return float(self.weights.get(metric, DEFAULT_WEIGHTS.get(metric, 1.0)))

    def check(self, metrics: Sequence[str]) -> None:
        """Refuses weights or thresholds on metrics no scorer returned."""
        for flag, names in (("--weight", self.weights), ("--min-chosen-score", self.min_chosen)):
            unknown = sorted(set(names) - set(metrics) - ({COMBINED} if flag == "--min-chosen-score" else set()))
            if unknown:
                raise ValueError(f"{flag} names {', '.join(unknown)}, but the scorers return {', '.join(sorted(metrics))}")
        if not any(self.weight(m) for m in metrics):
            raise ValueError(f"every metric ({', '.join(sorted(metrics))}) has weight 0: give one a --weight")


@dataclass
class Decision:
    """The rule's outcome for one prompt.

    Attributes:
        combined: combined score per candidate (None for an invalid one).
        chosen, rejected: candidate indices (None when fewer than two are valid).
        margin: combined chosen - combined rejected.
        skip: a ``SKIP_REASONS`` key, None for a pair.
        detail: the skip reason in words.
    """

    combined: list
    chosen: Optional[int] = None
    rejected: Optional[int] = None
    margin: float = 0.0
    skip: Optional[str] = None
    detail: str = ""


def metric_stats(candidates: Sequence[Optional[Mapping[str, float]]]) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, std)}`` over the given score dicts (None entries: invalid candidates)."""
    values: dict[str, list[float]] = {}
    for scores in candidates:
        for m, v in (scores or {}).items():
            values.setdefault(m, []).append(float(v))
    return {m: (float(np.mean(v)), float(np.std(v))) for m, v in sorted(values.items())}


def combined_score(scores: Mapping[str, float], stats: Mapping[str, tuple[float, float]], rule: PairRule) -> float:
    """Sum over metrics of weight * z-score (a metric without spread counts 0)."""
    total = 0.0
    for m, (mean, std) in stats.items():
        if std > 0 and rule.weight(m):
            total += rule.weight(m) * (float(scores[m]) - mean) / std
    return total


def choose(scores: Sequence[Optional[Mapping[str, float]]], stats: Mapping[str, tuple[float, float]],
           rule: PairRule) -> Decision:
    """Applies the rule to one prompt's candidates.

    Args:
        scores: per candidate its raw ``{metric: value}``, None when the candidate is invalid.
        stats: ``metric_stats`` of the whole run.
        rule: weights and thresholds.

    Returns:
        The decision (identical responses are checked by the caller, which holds them).
    """
    combined = [None if s is None else combined_score(s, stats, rule) for s in scores]
    valid = [i for i, c in enumerate(combined) if c is not None]
    if len(valid) < 2:
        return Decision(combined, skip="few_valid", detail=f"{len(valid)} valid candidate(s) of {len(scores)}")
    chosen = max(valid, key=lambda i: (combined[i], -i))
    rejected = min(valid, key=lambda i: (combined[i], i))
    d = Decision(combined, chosen, rejected, combined[chosen] - combined[rejected])
    if d.margin <= 0:
        d.skip, d.detail = "tie", "every candidate has the same combined score"
    elif d.margin < rule.min_margin:
        d.skip, d.detail = "margin", f"margin {d.margin:.4g} < --min-margin {rule.min_margin:g}"
    else:
        for metric, low in rule.min_chosen.items():
            value = combined[chosen] if metric == COMBINED else float(scores[chosen][metric])
            if value < low:
                d.skip, d.detail = "chosen_score", f"chosen {metric} {value:.4g} < --min-chosen-score {low:g}"
                break
    return d


# ---------------------------------------------------------------------------------------------
# Prompt records.

@dataclass
class PromptRecord:
    """One prompt of the run.

    Attributes:
        index: position among all prompts (files in order).
        id: the record's ``id`` or the index.
        source: ``file:line``.
        turns: the prompt conversation (``data.chat.Turn``).
        messages: the same as manifest messages (audio paths absolute).
        score_text: what text-reading scorers compare audio with.
        root: directory relative audio paths resolve against.
    """

    index: int
    id: str
    source: str
    turns: list
    messages: list
    score_text: Optional[str]
    root: str


def prompt_cut(turns: Sequence, mode: str) -> int:
    """Where a chat or Reason record's prompt ends: before its first assistant audio message in
    ``audio`` mode (a plan or earlier assistant text stays in the prompt), before its first
    assistant message in the ``plan`` and ``text`` modes."""
    for i, t in enumerate(turns):
        if t.role == "assistant" and (mode != "audio" or t.text is None):
            return i
    return len(turns)


def _prompt_turns(rec: Any, mode: str, instructions: Mapping[str, str]) -> list:
    from megatron_ualm.data.chat import KINDS, Turn, message_turn, record_turns
    from megatron_ualm.data.errors import RecordError

    if not isinstance(rec, dict):
        raise RecordError(f"a prompt record must be a JSON object, got {type(rec).__name__}")
    if "messages" in rec or "conversations" in rec or rec.get("kind") in KINDS:
        turns, field = record_turns(rec, instructions), "messages"
        turns = turns[:prompt_cut(turns, mode)]
    elif isinstance(rec.get("prompt"), str):
        if not rec["prompt"].strip():
            raise RecordError("is empty text", "prompt")
        return [Turn("user", "prompt", "prompt", text=rec["prompt"])]
    elif isinstance(rec.get("prompt"), list) and rec["prompt"]:
        turns, field = [message_turn(m, f"prompt[{i}]") for i, m in enumerate(rec["prompt"])], "prompt"
    else:
        raise RecordError('needs "prompt" (text or a list of chat messages), "messages" (a chat record) or a '
                          'UALM-Reason "kind" record, e.g. {"id": "a1", "prompt": "rain on a tin roof"}')
    if not any(t.role != "assistant" for t in turns):
        raise RecordError("has no user or system message before the reply: nothing to prompt with", field)
    return turns


def manifest_message(turn, root: str) -> dict:
    """A prompt turn as a chat manifest message (audio paths made absolute)."""
    from megatron_ualm.data.errors import RecordError

    msg: dict = {"role": turn.role}
    if turn.text is not None:
        msg["content"] = turn.text
    elif turn.codes is not None:
        msg["codes"] = jobs.check_codes(turn.codes, turn.field)
    else:
        if turn.role == "assistant":
            raise RecordError("is assistant audio from a file; give a prompt's earlier audio out as codes", turn.field)
        path, start, end = jobs.audio_path(turn, root)
        msg["audio"] = path
        msg.update({k: v for k, v in (("start", start), ("end", end)) if v is not None})
    return msg


def read_prompts(paths: Sequence[str], mode: str, audio_root: Optional[str] = None) -> list[PromptRecord]:
    """All prompt records of the files, checked.

    Accepted lines: ``{"prompt": "text" | [chat messages], "id"?, "score_text"?}``, a chat
    record ``{"messages": [...]}`` or a UALM-Reason record (``"kind"``); the last two are cut
    with ``prompt_cut``.

    Raises:
        ValueError: a bad record, naming ``file:line`` and the field.
    """
    from megatron_ualm.data.chat import default_instructions
    from megatron_ualm.data.errors import RecordError

    instructions = default_instructions()

    def parse(rec: dict, root: str) -> tuple:
        turns = _prompt_turns(rec, mode, instructions)
        messages = [manifest_message(t, root) for t in turns]
        if mode == "text" and not any(t.audio is not None and t.role != "assistant" for t in turns):
            raise RecordError("has no audio-in message: --mode text scores each reply against the prompt's audio",
                              "prompt")
        score_text = rec.get("score_text")
        if score_text is not None and not isinstance(score_text, str):
            raise RecordError("must be a string", "score_text")
        if score_text is None:
            texts = [t.text for t in turns if t.text is not None and t.role != "system"]
            score_text = texts[-1] if texts else None
        return turns, messages, score_text

    return [PromptRecord(i, rid, where, turns, messages, score_text, root)
            for i, rid, where, root, (turns, messages, score_text) in jobs.read_inputs(paths, audio_root, parse)]


def records_digest(records: Sequence[PromptRecord]) -> str:
    blob = json.dumps([(r.id, r.messages, r.score_text) for r in records], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_assignments(parser: argparse.ArgumentParser, items: Sequence[str], flag: str) -> dict[str, float]:
    """``["clap=2", "aes=0.5"]`` -> ``{"clap": 2.0, "aes": 0.5}``."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            parser.error(f"{flag} {item!r}: give METRIC=NUMBER, e.g. clap=1.5")
        if not name:
            parser.error(f"{flag} {item!r}: give METRIC=NUMBER, e.g. clap=1.5")
    return out


# ---------------------------------------------------------------------------------------------
# Candidates: decoding and scoring one group.

@dataclass
class Candidate:
    """One sampled response: its text (plan / text modes), codes ``[K, T]`` and waveform."""

    text: Optional[str] = None
    codes: Any = None
    wave: Optional[np.ndarray] = None
    rate: int = 0
    invalid: Optional[str] = None


def generate_candidates(ualm, conversations: Sequence[list], n: int, mode: str, params) -> list[list[Candidate]]:
    """``n`` candidates per conversation, decoded as one batch (CFG on audio)."""
    from megatron_ualm.inference import Turn
    from megatron_ualm.inference.reasoning import text_params

    rows = [list(c) for c in conversations for _ in range(n)]
    audio_params = dataclasses.replace(params, stop_at_eot=True)  # the reply ends with its audio message
    cands = [Candidate() for _ in rows]
    if mode in ("text", "plan"):
        for cand, reply in zip(cands, ualm.respond(rows, text_params(params), modality="text")):
            cand.text = reply.text.strip()
            if not cand.text:
                cand.invalid = "empty text"
    if mode in ("audio", "plan"):
        todo = [i for i, c in enumerate(cands) if c.invalid is None]
        audio_rows = [rows[i] + ([Turn("assistant", text=cands[i].text)] if mode == "plan" else []) for i in todo]
        for i, reply in zip(todo, ualm.respond(audio_rows, audio_params, modality="audio") if todo else []):
            if not reply.codes or reply.codes[-1].shape[1] == 0:
                cands[i].invalid = "no audio"
            else:
                cands[i].codes = reply.codes[-1]
                cands[i].wave = reply.waves[-1] if reply.waves else None
                cands[i].rate = reply.sample_rate
    return [cands[j * n:(j + 1) * n] for j in range(len(conversations))]


def score_group(scorers: Sequence, records: Sequence[PromptRecord], groups: Sequence[list[Candidate]], mode: str,
                prompt_audio: Sequence[Optional[np.ndarray]]) -> list[list[Optional[dict]]]:
    """Raw scores of every valid candidate of a group (one call per scorer), None for invalid ones.

    Audio modes score each candidate's waveform against the prompt's ``score_text``; the text
    mode scores the prompt's audio-in clip against each candidate's text.
    """
    from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE

    where = [(j, c) for j, cands in enumerate(groups) for c, cand in enumerate(cands) if cand.invalid is None]
    if mode == "text":
        waves = [prompt_audio[j] for j, _ in where]
        rate = AUDIO_IN_SAMPLE_RATE
        texts = [groups[j][c].text for j, c in where]
    else:
        waves = [groups[j][c].wave for j, c in where]
        rate = groups[where[0][0]][where[0][1]].rate if where else 0
        texts = [records[j].score_text for j, _ in where]
    out: list[list[Optional[dict]]] = [[None] * len(cands) for cands in groups]
    for j, c in where:
        out[j][c] = {}
    if not where:
        return out
    for scorer in scorers:
        if scorer.needs_text and any(t is None for t in texts):
            source = records[where[texts.index(None)][0]].source
            raise ValueError(f"{source}: the {scorer.name} scorer compares audio with text, but the prompt has no text: "
                             'give the record a "score_text"')
        result = scorer.score(waves, rate, texts if scorer.needs_text else None)
        for metric, values in result.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (len(where),) or not np.all(np.isfinite(values)):
                raise ValueError(f"scorer {scorer.name} returned {values.shape} {metric!r} values (some not finite?) "
                                 f"for {len(where)} clips; a scorer returns one finite value per clip")
            for (j, c), v in zip(where, values):
                out[j][c][metric] = float(v)
    return out


def journal_record(record: PromptRecord, cands: Sequence[Candidate], scores: Sequence[Optional[dict]],
                   out: str, audio_format: str) -> dict:
    """Writes a prompt's codes (and WAVs) and returns its completion record."""
    name = f"{record.index:07d}"
    entries = []
    codes = {}
    for c, (cand, s) in enumerate(zip(cands, scores)):
        e: dict = {} if cand.text is None else {"text": cand.text}
        if cand.invalid is not None:
            e["invalid"] = cand.invalid
        if cand.codes is not None:
            e["frames"] = int(cand.codes.shape[1])
            codes[f"c{c}"] = cand.codes.cpu().numpy()
            if audio_format == "wav":
                e["audio"] = f"audio/{name}_{c}.wav"
                jobs.save_wav(os.path.join(out, e["audio"]), cand.wave, cand.rate)
        if s is not None:
            e["scores"] = s
        entries.append(e)
    rec = {"index": record.index, "id": record.id, "candidates": entries}
    if codes:
        rec["codes"] = os.path.relpath(jobs.save_codes(os.path.join(out, "codes", f"{name}.npz"), codes), out)
    return rec


# ---------------------------------------------------------------------------------------------
# The manifests.

def _audio_message(entry: dict, c: int, codes) -> dict:
    if "audio" in entry:
        return {"audio": entry["audio"]}
    return {"codes": codes[f"c{c}"].tolist()}


def response(mode: str, entry: dict, c: int, codes) -> list[dict]:
    """Candidate ``c`` as assistant messages (text, then audio, as the mode has them)."""
    msgs = [{"content": entry["text"]}] if mode in ("text", "plan") else []
    if mode in ("audio", "plan"):
        msgs.append(_audio_message(entry, c, codes))
    return msgs


def _same(mode: str, entry_a: dict, entry_b: dict, a: int, b: int, codes) -> bool:
    if entry_a.get("text") != entry_b.get("text"):
        return False
    return mode == "text" or np.array_equal(codes[f"c{a}"], codes[f"c{b}"])


def finalize(out: str, records: Sequence[PromptRecord], mode: str, rule: PairRule) -> Optional[dict]:
    """Applies the rule to every prompt and writes the manifests, or returns None while prompts
    are unfinished. Returns the summary."""
    journal = jobs.read_journals(out, JOURNAL)
    if any(r.index not in journal for r in records):
        return None
    for r in records:
        if journal[r.index]["id"] != r.id:
            raise ValueError(f"{out}: the journal's prompt {r.index} is {journal[r.index]['id']!r}, the input's is "
                             f"{r.id!r}: the prompt files changed; write to a new --out")
    all_scores = [e.get("scores") for r in records for e in journal[r.index]["candidates"]]
    stats = metric_stats(all_scores)
    if not stats:
        raise ValueError("no candidate was scored (every one invalid): check --max-audio-seconds and the model")
    rule.check(list(stats))
    pairs, adaptation, skipped = [], [], []
    counts = {k: 0 for k in SKIP_REASONS}
    for r in records:
        entries = journal[r.index]["candidates"]
        d = choose([e.get("scores") for e in entries], stats, rule)
        codes = None
        if d.skip is None and "codes" in journal[r.index]:
            with np.load(os.path.join(out, journal[r.index]["codes"])) as z:
                codes = {k: z[k] for k in z.files}
        if d.skip is None and _same(mode, entries[d.chosen], entries[d.rejected], d.chosen, d.rejected, codes):
            d.skip, d.detail = "identical", f"candidates {d.chosen} and {d.rejected} are the same response"
        if d.skip is not None:
            counts[d.skip] += 1
            skipped.append({"id": r.id, "reason": d.skip, "detail": d.detail})
            continue
        chosen, rejected = (response(mode, entries[c], c, codes) for c in (d.chosen, d.rejected))
        candidates = [dict(({"scores": e["scores"], COMBINED: c} if "scores" in e else {"invalid": e["invalid"]}),
                           **{k: e[k] for k in ("frames", "audio") if k in e}) for e, c in zip(entries, d.combined)]
        pairs.append({
            "id": r.id, "prompt": r.messages,
            "chosen": chosen if len(chosen) > 1 else chosen[0], "rejected": rejected if len(rejected) > 1 else rejected[0],
            "margin": d.margin, "chosen_index": d.chosen, "rejected_index": d.rejected,
            "scores": {"chosen": {**entries[d.chosen]["scores"], COMBINED: d.combined[d.chosen]},
                       "rejected": {**entries[d.rejected]["scores"], COMBINED: d.combined[d.rejected]}},
            "candidates": candidates})
        adaptation.append({"id": r.id, "messages": [dict(m, loss=False) for m in r.messages]
                           + [dict(role="assistant", **m) for m in chosen]})
    summary = {
        "prompts": len(records), "pairs": len(pairs), "skipped": counts, "mode": mode,
        "metrics": {m: {"mean": mu, "std": sd, "weight": rule.weight(m)} for m, (mu, sd) in stats.items()},
        "min_margin": rule.min_margin, "min_chosen_score": dict(rule.min_chosen),
    }
    for name, rows in (("pairs", pairs), ("adaptation", adaptation), ("skipped", skipped)):
        atomic_write(os.path.join(out, f"{name}.jsonl"), jsonl_text(rows))
    atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    return summary


def describe(summary: dict, out: str) -> str:
    skipped = ", ".join(f"{n} {SKIP_REASONS[k]}" for k, n in summary["skipped"].items() if n) or "none"
    return (f"{summary['pairs']} pairs from {summary['prompts']} prompts (skipped: {skipped}) -> "
            f"{os.path.join(out, 'pairs.jsonl')}, {os.path.join(out, 'adaptation.jsonl')}")


# ---------------------------------------------------------------------------------------------
# The command.

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron_ualm.inference.checkpoint import add_model_args, check_model_args

    p = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("prompts and outputs")
    g.add_argument("--prompts", nargs="+", required=True,
                   help='JSONL files: {"prompt": "text" | [chat messages], "id"?, "score_text"?} lines, chat records '
                        '{"messages": [...]}, or UALM-Reason records ("kind"); a chat or Reason record\'s prompt is '
                        "its messages before the first assistant audio (--mode audio) or assistant message")
    g.add_argument("--out", required=True, help="output folder (rerunning the same command resumes)")
    g.add_argument("--audio-root", help="where relative audio paths of the prompts resolve (default: each file's folder)")
    g.add_argument("--mode", choices=MODES, default="audio",
                   help="audio (default): the reply is audio; plan: a text plan then audio; text: a text reply scored "
                        "against the prompt's audio")
    g.add_argument("--num-candidates", type=int, default=8, help="candidates per prompt (default 8)")
    g.add_argument("--audio-format", choices=("codes", "wav"), default="codes",
                   help="codes (default): the manifests hold the codes the model wrote (exact); wav: WAV files in "
                        "<out>/audio, re-encoded by the data tools' codec")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = p.add_argument_group("scoring and the rule")
    s.add_argument("--scorer", action="append", default=[], metavar="SPEC=PATH", required=True,
                   help="a scorer and its local weights (repeatable): clap=DIR (LAION-CLAP, transformers layout), "
                        "aesthetics=PATH (AudioBox-Aesthetics checkpoint.pt), or package.module:Class=PATH (a "
                        "megatron_ualm.evaluation.scorers.Scorer subclass)")
    s.add_argument("--scorer-device", help="torch device of the scorers (default: this rank's GPU, else cpu)")
    s.add_argument("--weight", action="append", default=[], metavar="METRIC=W",
                   help="weight of a metric's z-score in the combined score (default 1 for clap, aes and plug-in "
                        "metrics, 0 for aes_ce/aes_cu/aes_pc/aes_pq)")
    s.add_argument("--min-margin", type=float, default=0.0,
                   help="skip a prompt whose combined-score margin (chosen - rejected, in standard deviations) is "
                        "below this (default 0: any positive margin)")
    s.add_argument("--min-chosen-score", action="append", default=[], metavar="METRIC=V",
                   help="skip a prompt whose chosen candidate scores below V on METRIC (raw) or 'combined' (repeatable)")
    add_model_args(p)
    jobs.add_decoding_args(p, text_temperature=0.8, min_audio_seconds=1.0)
    jobs.add_task_args(p)
    args = p.parse_args(argv)
    check_model_args(p, args, need_codec=args.mode != "text")
    jobs.check_decoding_args(p, args)
    if args.num_candidates < 2:
        p.error("--num-candidates must be >= 2 (a pair needs two responses)")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    args.scorers = []
    for item in args.scorer:
        spec, _, path = item.partition("=")
        if not spec or not path:
            p.error(f"--scorer {item!r}: give SPEC=PATH, e.g. clap=/models/clap")
        if not os.path.exists(path):
            p.error(f"--scorer {item}: {path} does not exist")
        args.scorers.append((spec, os.path.abspath(path)))
    for flag, path in [("--prompts", f) for f in args.prompts] + [("--tokenizer", args.tokenizer), ("--codec", args.codec),
                                                                   ("--load", args.load), ("--audio-root", args.audio_root)]:
        if path and not os.path.exists(path):
            p.error(f"{flag} {path} does not exist")
    args.rule = PairRule(parse_assignments(p, args.weight, "--weight"), args.min_margin,
                         parse_assignments(p, args.min_chosen_score, "--min-chosen-score"))
    jobs.resolve_outer_task(p, args)
    return args


def run(args) -> None:
    """Decodes and scores this launch's unfinished prompts, then writes the manifests when the run is done."""
    from megatron_ualm import api

    records = read_prompts(args.prompts, args.mode, args.audio_root)
    jobs.check_run(args.out, dict(mode=args.mode, num_candidates=args.num_candidates, audio_format=args.audio_format,
                             scorers=args.scorers, prompts=records_digest(records), model=jobs.model_identity(args)),
              started=bool(jobs.read_journals(args.out, JOURNAL)))
    launch = jobs.start_launch(args)
    done = jobs.done_items(launch, args.out, JOURNAL)
    n = len(records)
    if any(jobs.task_groups(n, args.batch_size, t, done) for t in launch.tasks):
        _decode(args, launch, records, done)
    if launch.writer and (launch.rank == 0 or jobs.task_groups(n, args.batch_size, launch.task, done)):
        summary = finalize(args.out, records, args.mode, args.rule)
        if summary is not None:
            print(describe(summary, args.out), flush=True)
        elif launch.rank == 0:
            left = n - len(jobs.read_journals(args.out, JOURNAL))
            print(f"this launch's prompts are done; {left} prompt(s) of other tasks remain: the manifests are written "
                  "when the last task finishes (rerun any task to write them)", flush=True)
    api.destroy_parallel()


def _decode(args, launch: jobs.Launch, records: Sequence[PromptRecord], done: set) -> None:
    from megatron_ualm.inference.checkpoint import build_ualm
    from megatron_ualm.evaluation.scorers import load_scorer

    scorers = [load_scorer(spec, path, args.scorer_device or jobs.scorer_device()) for spec, path in args.scorers] \
        if launch.writer else []  # before the model: a wrong scorer fails fast
    if args.mode == "text" and any(not s.needs_text for s in scorers):
        raise jobs.fail(f"--mode text ranks replies by how well they match the prompt's audio; scorer(s) "
                   f"{', '.join(s.name for s in scorers if not s.needs_text)} do not read text")
    ualm = build_ualm(args)  # every replica loads (checkpoint loading is collective)
    journal = jobs.Journal(jobs.journal_path(args.out, JOURNAL, launch.task))
    groups = jobs.task_groups(len(records), args.batch_size, launch.task, done)
    total = jobs.task_items(len(records), args.batch_size, launch.task)
    left = sum(i not in done for _, g in groups for i in g)
    with progress_bar(total, f"pairs ({launch.task.tag})", "prompt", launch.rank == 0 and not args.no_progress,
                      initial=total - left) as bar:
        for k, items in groups:
            group = [records[i] for i in items]
            conversations = [[jobs.inference_turn(t, r.root) for t in r.turns] for r in group]
            try:
                cands = generate_candidates(ualm, conversations, args.num_candidates, args.mode,
                                            jobs.decoding_params(args, args.seed + k))
            except ValueError as err:  # e.g. prompt + reply longer than the model's sequence
                raise jobs.fail(f"{group[0].source}: {err}") from None
            if launch.writer:
                prompt_audio = [next((t.audio for t in reversed(c) if t.audio is not None), None) for c in conversations]
                scores = score_group(scorers, group, cands, args.mode, prompt_audio)
                for r, c, s in zip(group, cands, scores):
                    if r.index not in done:
                        journal.append(journal_record(r, c, s, args.out, args.audio_format))
            bar.update(sum(i not in done for i in items))


def make_preference_pairs_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/make_preference_pairs.py`` / ``ualm-make-preference-pairs``."""
    return jobs.tool_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(make_preference_pairs_main())
