"""Self-reflection SFT data from the model's own first attempts (``tools/build_reflection_data.py``).

UALM-Reason's second round: the round-1 model generates audio from a plan, the audio it
actually made is captioned, a critic compares plan and caption, and the sample becomes
plan -> audio 1 -> caption 1 -> critique -> audio 2 (``data.chat``'s ``self_reflection`` kind).

Input: JSONL records with a plan, e.g. UALM-Reason enrichment records::

    {"id": "k7", "prompt": "a busy kitchen", "rich_caption": {"keywords": [...], "layout": "...",
     "description": "..."} | "Keywords: ...", "audio": "clips/kitchen.wav" | "codes": [[...]],
     "start": 0.0, "end": 10.0, "system": "...", "critique_prompt": "... {caption} ..."}

``audio`` / ``codes`` (the target) and ``system`` / ``critique_prompt`` are optional. Stages,
each resumable (completion records appended and flushed per item, finished items skipped on a
rerun, files written under temporary names), all in ``--out``:

1. **First pass** (with the model flags): audio 1 from the plan -- the conversation system +
   request + rich caption, CFG -- then its caption through the model's own understanding path:
   the codes are decoded to a waveform by the codec and heard by the model's audio encoder
   (``UALM.respond`` with an audio-in turn and the listen instruction, as
   ``inference.reasoning.self_reflection`` does). Writes ``first_pass.jsonl``, ``codes/`` (and
   WAVs with ``--write-wavs``); when every record is through, ``critic_requests.jsonl``: the
   records for a critic to fill, ``{"id", "prompt", "plan", "caption_1", "audio_1"?,
   "critique": null}``.
2. **Critique** (a plug-in): ``--critic-model PATH``, a local ``transformers`` causal LM
   prompted with plan vs. caption (``--critic-template``; chat template applied when the
   tokenizer has one), writes ``critiques.jsonl``; or ``--critic-file FILE``, JSONL with
   ``{"id", "critique"}`` per record from any outside tool (``critic_requests.jsonl`` with the
   field filled in will do), joined by id. The model critic runs in one process: under a
   multi-rank launch give it its own invocation without the model flags.
3. **Audio 2**, by this rule: the record's own target audio (``audio`` or ``codes``) when it
   has one -- the audio that matches the plan, as the paper builds its round-2 data; otherwise a
   second generation: the model writes audio 2 after the whole self-reflection context (plan,
   audio 1, caption 1, critique), as the inference loop refines. Without a target, SFT-2 then
   teaches the critique and the format more than better audio: give targets when there are any.
   Second generations need the model flags (``refined.jsonl``).
4. **Assembly**: ``self_reflection.jsonl`` (``{"kind": "self_reflection", "id", "prompt",
   "rich_caption", "codes_1", "caption_1", "critique", "audio_2" | "codes_2"}`` for
   ``tools/preprocess_chat.py``; audio 1 carries no loss there by default) and ``summary.json``
   with the records skipped and why (no audio 1, empty caption, no or empty critique).

One command with the model flags and ``--critic-model`` does every stage in a world of one;
on a cluster: the first pass (torchrun, TP / PP / data-parallel), the critic (one process, its
own GPU), then the model command again for second generations and assembly. Each invocation
does what its flags and the files allow and says what is left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_ualm.files import atomic_write, jsonl_text, read_jsonl
from megatron_ualm.launch import program_name
from megatron_ualm.posttraining import jobs
from megatron_ualm.progress import progress_bar

FIRST, CRITIQUES, REFINED = "first_pass", "critiques", "refined"
REFINE_SEED_OFFSET = 1 << 20  # audio 2 samples from another stream than audio 1 of the same group
CRITIC_TEMPLATE = (
    "You review generated audio. The plan for the audio was:\n{plan}\n\n"
    "A listener describes the audio that was actually generated:\n{caption}\n\n"
    "Compare the two. In two or three sentences, say what is missing or wrong in the audio and how to fix it."
)
SKIPS = {"no_audio_1": "the model wrote no audio 1", "empty_caption": "the caption of audio 1 is empty",
         "no_critique": "no critique for the record", "empty_critique": "the critique is empty",
         "no_audio_2": "the second generation wrote no audio"}
_PLACEHOLDER = [[0]]  # record_turns wants the record's last audio; it is cut off before decoding


@dataclass
class PlanRecord:
    """One input record.

    Attributes:
        index: position among all records.
        id: the record's ``id`` or the index.
        source: ``file:line``.
        rec: its fields as the output keeps them (target audio path made absolute).
        plan: the rich caption as the text the model sees.
        has_target: the record gives audio 2.
    """

    index: int
    id: str
    source: str
    rec: dict
    plan: str
    has_target: bool


def reflection_turns(rec: dict, codes_1=None, caption_1: Optional[str] = None, critique: Optional[str] = None) -> list:
    """The conversation before audio 1 (``codes_1`` None) or before audio 2, laid out by
    ``data.chat.record_turns`` so that decoding sees what SFT-2 trains on."""
    from megatron_ualm.data.chat import default_instructions, record_turns

    base = {k: rec[k] for k in ("prompt", "rich_caption", "system", "critique_prompt") if k in rec}
    if codes_1 is None:
        full = {**base, "kind": "enrichment", "codes": _PLACEHOLDER}
    else:
        full = {**base, "kind": "self_reflection", "codes_1": codes_1, "caption_1": caption_1, "critique": critique,
                "codes_2": _PLACEHOLDER}
    return record_turns(full, default_instructions())[:-1]


def read_plans(paths: Sequence[str], audio_root: Optional[str] = None) -> list[PlanRecord]:
    """The input records, checked.

    Raises:
        ValueError: a bad record, naming ``file:line`` and the field.
    """
    from megatron_ualm.data.errors import RecordError
    from megatron_ualm.data.records import audio_source

    def parse(raw: dict, root: str) -> tuple:
        rec = {k: raw[k] for k in ("prompt", "rich_caption", "system", "critique_prompt", "codes", "start", "end")
               if raw.get(k) is not None}
        turns = reflection_turns(rec)
        if rec.get("codes") is not None:
            jobs.check_codes(rec["codes"], "codes")
        elif raw.get("audio") is not None:
            source, _ = audio_source(raw, ("audio",), root)
            if not isinstance(source, str) or not os.path.isfile(source):
                raise RecordError(f"audio file {source} does not exist (relative paths resolve against --audio-root, "
                                  "default the input file's folder)", "audio")
            rec["audio"] = os.path.abspath(source)
        return rec, next(t.text for t in turns if t.part == "plan")

    return [PlanRecord(i, rid, where, rec, plan, "audio" in rec or "codes" in rec)
            for i, rid, where, _, (rec, plan) in jobs.read_inputs(paths, audio_root, parse)]


# ---------------------------------------------------------------------------------------------
# Critics.

class CausalLMCritic:
    """A local ``transformers`` causal LM that writes a critique from plan and caption.

    Args:
        path: the model folder (``save_pretrained`` layout, with its tokenizer).
        device: torch device.
        template: the request, with ``{plan}`` and ``{caption}``; wrapped in the tokenizer's
            chat template when it has one.
        max_new_tokens: critique length limit.
    """

    def __init__(self, path: str, device: str, template: str = CRITIC_TEMPLATE, max_new_tokens: int = 128) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.device, self.template, self.max_new_tokens = device, template, max_new_tokens

    def request(self, plan: str, caption: str) -> str:
        text = self.template.format(plan=plan, caption=caption)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text + "\n\nCritique:"

    def critique(self, items: Sequence[tuple[str, str]]) -> list[str]:
        """Greedy critiques of ``(plan, caption)`` pairs, as one batch."""
        import torch

        enc = self.tokenizer([self.request(p, c) for p, c in items], return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        start = enc["input_ids"].shape[1]
        return [self.tokenizer.decode(row[start:], skip_special_tokens=True).strip() for row in out]


def read_critic_file(path: str) -> dict[str, str]:
    """``{id: critique}`` from an outside critic's JSONL (records without a critique left out)."""
    out: dict[str, str] = {}
    for line, rec in read_jsonl(path):
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f'{path}:{line}: needs "id" and "critique", e.g. {{"id": "k7", "critique": "..."}}')
        rid = str(rec["id"])
        if rid in out:
            raise ValueError(f"{path}:{line}: id {rid!r} appears twice")
        value = rec.get("critique")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}:{line}: field 'critique' must be a string, got {type(value).__name__}")
        if value is not None:
            out[rid] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------
# The stages.

def _codes(out: str, rel: str, name: str):
    import numpy as np

    with np.load(os.path.join(out, rel)) as z:
        return z[name]


def first_pass(args, launch, ualm, plans: Sequence[PlanRecord], done: set) -> None:
    """Audio 1 and its caption for this task's unfinished records."""
    import dataclasses

    from megatron_ualm.inference import Turn
    from megatron_ualm.inference.reasoning import ReasoningPrompts, text_params

    listen = ReasoningPrompts().listen
    model = ualm()  # on every rank, also a replica without groups: loading a checkpoint is collective
    journal = jobs.Journal(jobs.journal_path(args.out, FIRST, launch.task))
    groups = jobs.task_groups(len(plans), args.batch_size, launch.task, done)
    total = jobs.task_items(len(plans), args.batch_size, launch.task)
    left = sum(i not in done for _, g in groups for i in g)
    with progress_bar(total, f"first pass ({launch.task.tag})", "plan", launch.rank == 0 and not args.no_progress,
                      initial=total - left) as bar:
        for k, items in groups:
            group = [plans[i] for i in items]
            params = jobs.decoding_params(args, args.seed + k)
            conversations = [[jobs.inference_turn(t, "") for t in reflection_turns(r.rec)] for r in group]
            replies = model.respond(conversations, dataclasses.replace(params, stop_at_eot=True), modality="audio")
            heard = [j for j, r in enumerate(replies) if r.codes and r.codes[-1].shape[1] > 0]
            captions = model.respond([[Turn("user", audio=replies[j].waves[-1], sample_rate=replies[j].sample_rate),
                                        Turn("user", text=listen)] for j in heard], text_params(params), "text") \
                if heard else []
            caption_of = {j: c.text.strip() for j, c in zip(heard, captions)}
            if launch.writer:
                for j, r in enumerate(group):
                    if r.index in done:
                        continue
                    entry = {"index": r.index, "id": r.id}
                    if j not in caption_of:
                        entry["invalid"] = "no_audio_1"
                    else:
                        name = f"{r.index:07d}_1"
                        codes = replies[j].codes[-1]
                        entry.update(frames=int(codes.shape[1]), caption_1=caption_of[j], codes=os.path.relpath(
                            jobs.save_codes(os.path.join(args.out, "codes", f"{name}.npz"), {"codes": codes.numpy()}),
                            args.out))
                        if args.write_wavs:
                            entry["audio_1"] = f"audio/{name}.wav"
                            jobs.save_wav(os.path.join(args.out, entry["audio_1"]), replies[j].waves[-1],
                                       replies[j].sample_rate)
                        if not caption_of[j]:
                            entry["invalid"] = "empty_caption"
                    journal.append(entry)
            bar.update(sum(i not in done for i in items))


def write_requests(out: str, plans: Sequence[PlanRecord], first: dict) -> Optional[int]:
    """``critic_requests.jsonl``: the first-pass records a critic should fill.

    Returns:
        How many, or None when the file already held them.
    """
    rows = [{"id": r.id, "prompt": r.rec["prompt"], "plan": r.plan, "caption_1": first[r.index]["caption_1"],
             **({"audio_1": first[r.index]["audio_1"]} if "audio_1" in first[r.index] else {}), "critique": None}
            for r in plans if "invalid" not in first[r.index]]
    path = os.path.join(out, "critic_requests.jsonl")
    text = jsonl_text(rows)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return None
    atomic_write(path, text)
    return len(rows)


def run_critic(args, plans: Sequence[PlanRecord], first: dict) -> None:
    """The model critic over the first-pass records without a critique yet."""
    journal = jobs.Journal(os.path.join(args.out, f"{CRITIQUES}.jsonl"))
    journal.repair()
    done = jobs.read_journals(args.out, CRITIQUES)
    critic = os.path.abspath(args.critic_model)
    other = {rec.get("critic") for rec in done.values()} - {critic}
    if other:
        raise ValueError(f"{args.out}/{CRITIQUES}.jsonl holds critiques by {sorted(map(str, other))[0]}, this run's "
                         f"critic is {critic}: delete the file to critique again, or use that critic")
    todo = [r for r in plans if "invalid" not in first[r.index] and r.index not in done]
    if not todo:
        return
    model = CausalLMCritic(critic, args.critic_device or jobs.scorer_device(), args.critic_template,
                           args.critic_max_new_tokens)
    total = sum("invalid" not in first[r.index] for r in plans)
    with progress_bar(total, "critic", "plan", not args.no_progress, initial=total - len(todo)) as bar:
        for start in range(0, len(todo), args.critic_batch_size):
            chunk = todo[start:start + args.critic_batch_size]
            texts = model.critique([(r.plan, first[r.index]["caption_1"]) for r in chunk])
            for r, text in zip(chunk, texts):
                journal.append({"index": r.index, "id": r.id, "critique": text, "critic": critic})
            bar.update(len(chunk))


def critiques_of(args) -> dict[str, str]:
    """``{id: critique}`` from ``--critic-file``, else from the model critic's journal."""
    if args.critic_file:
        return read_critic_file(args.critic_file)
    return {rec["id"]: rec["critique"] for rec in jobs.read_journals(args.out, CRITIQUES).values()}


def needs_refine(r: PlanRecord, first: dict, critiques: dict) -> bool:
    return not r.has_target and "invalid" not in first[r.index] and bool(critiques.get(r.id))


def refine(args, launch, ualm, plans: Sequence[PlanRecord], first: dict, critiques: dict, done: set) -> None:
    """Audio 2 by a second generation for this task's records without a target."""
    import dataclasses

    model = ualm()  # on every rank (collective loading)
    journal = jobs.Journal(jobs.journal_path(args.out, REFINED, launch.task))
    eligible = {r.index for r in plans if needs_refine(r, first, critiques)}
    # The fixed groups of the first pass, each cut to its eligible records (a group's batch does
    # not depend on what finished before, so a resumed run decodes what an uninterrupted one does).
    owned = [(k, [i for i in g if i in eligible]) for k, g in jobs.task_groups(len(plans), args.batch_size, launch.task, set())]
    groups = [(k, g) for k, g in owned if any(i not in done for i in g)]
    total = sum(len(g) for _, g in owned)
    left = sum(i not in done for _, g in groups for i in g)
    with progress_bar(total, f"audio 2 ({launch.task.tag})", "plan", launch.rank == 0 and not args.no_progress,
                      initial=total - left) as bar:
        for k, items in groups:
            group = [plans[i] for i in items]
            conversations = []
            for r in group:
                codes_1 = _codes(args.out, first[r.index]["codes"], "codes").tolist()
                turns = reflection_turns(r.rec, codes_1, first[r.index]["caption_1"], critiques[r.id])
                conversations.append([jobs.inference_turn(t, "") for t in turns])
            params = dataclasses.replace(jobs.decoding_params(args, args.seed + REFINE_SEED_OFFSET + k), stop_at_eot=True)
            replies = model.respond(conversations, params, modality="audio")
            if launch.writer:
                for r, reply in zip(group, replies):
                    if r.index in done:
                        continue
                    entry = {"index": r.index, "id": r.id, "critique": critiques[r.id]}
                    if not reply.codes or reply.codes[-1].shape[1] == 0:
                        entry["invalid"] = "no_audio_2"
                    else:
                        path = os.path.join(args.out, "codes", f"{r.index:07d}_2.npz")
                        entry.update(frames=int(reply.codes[-1].shape[1]), codes=os.path.relpath(
                            jobs.save_codes(path, {"codes": reply.codes[-1].numpy()}), args.out))
                    journal.append(entry)
            bar.update(sum(i not in done for i in items))


def assemble(args, plans: Sequence[PlanRecord], first: dict, critiques: dict, refined: dict) -> tuple[Optional[dict], str]:
    """Writes ``self_reflection.jsonl`` and ``summary.json`` when nothing is pending.

    Returns:
        ``(summary, "")``, or ``(None, what is still to do)``.
    """
    missing = [r for r in plans if r.index not in first]
    if missing:
        return None, (f"{len(missing)} record(s) still need the first pass (audio 1 and its caption): run with the "
                      "model flags (--load ...)")
    valid = [r for r in plans if "invalid" not in first[r.index]]
    if not args.critic_file:
        waiting = [r for r in valid if r.id not in critiques]
        if waiting:
            return None, (f"{len(waiting)} record(s) await a critique in {args.out}/critic_requests.jsonl: run with "
                          "--critic-model PATH, or fill the file's \"critique\" fields and pass it as --critic-file")
    waiting = [r for r in plans if needs_refine(r, first, critiques) and r.index not in refined]
    changed = [r.id for r in plans if needs_refine(r, first, critiques) and r.index in refined
               and refined[r.index]["critique"] != critiques[r.id]]
    if changed:
        raise ValueError(f"record {changed[0]!r} (and {len(changed) - 1} more): its critique differs from the one its "
                         f"audio 2 was generated after ({args.out}/{REFINED}*.jsonl); use that critique, or delete "
                         "those files to generate audio 2 again")
    if waiting:
        return None, (f"{len(waiting)} record(s) without target audio need audio 2 generated: run with the model "
                      "flags (--load ...)")
    rows, skipped = [], {k: 0 for k in SKIPS}
    for r in plans:
        f = first[r.index]
        reason = f.get("invalid")
        if reason is None and r.id not in critiques:
            reason = "no_critique"
        elif reason is None and not critiques[r.id]:
            reason = "empty_critique"
        elif reason is None and not r.has_target:
            reason = refined[r.index].get("invalid")
        if reason is not None:
            skipped[reason] += 1
            continue
        row = {"kind": "self_reflection", "id": r.id, "prompt": r.rec["prompt"], "rich_caption": r.rec["rich_caption"],
               **{k: r.rec[k] for k in ("system", "critique_prompt") if k in r.rec},
               "codes_1": _codes(args.out, f["codes"], "codes").tolist(), "caption_1": f["caption_1"],
               "critique": critiques[r.id]}
        if r.has_target:
            row.update({k: r.rec[k] for k in ("start", "end") if k in r.rec})
            row.update({"audio_2": r.rec["audio"]} if "audio" in r.rec else {"codes_2": r.rec["codes"]})
        else:
            row["codes_2"] = _codes(args.out, refined[r.index]["codes"], "codes").tolist()
        rows.append(row)
    summary = {"records": len(plans), "written": len(rows), "skipped": skipped,
               "audio_2": {"target": sum(r.has_target for r in plans), "generated": len(refined)}}
    atomic_write(os.path.join(args.out, "self_reflection.jsonl"), jsonl_text(rows))
    atomic_write(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1))
    return summary, ""


# ---------------------------------------------------------------------------------------------
# The command.

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from megatron_ualm.inference.checkpoint import add_model_args, check_model_args

    p = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("records and outputs")
    g.add_argument("--input", nargs="+", required=True,
                   help='JSONL of {"id"?, "prompt", "rich_caption", "audio" | "codes" (target, optional)} records')
    g.add_argument("--out", required=True, help="output folder (rerunning resumes)")
    g.add_argument("--audio-root", help="where relative audio paths resolve (default: each file's folder)")
    g.add_argument("--write-wavs", action="store_true", help="also write audio 1 as WAV (for critics that listen)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    c = p.add_argument_group("critic (one of)")
    c.add_argument("--critic-model", help="local transformers causal LM folder (with its tokenizer)")
    c.add_argument("--critic-file", help='JSONL of {"id", "critique"} written by any outside tool')
    c.add_argument("--critic-template", default=CRITIC_TEMPLATE, help="the critic's request, with {plan} and {caption}")
    c.add_argument("--critic-max-new-tokens", type=int, default=128, help="critique length limit (default 128)")
    c.add_argument("--critic-batch-size", type=int, default=8, help="critiques generated together (default 8)")
    c.add_argument("--critic-device", help="torch device of the critic (default: the GPU if any)")
    add_model_args(p)
    jobs.add_decoding_args(p, text_temperature=0.0, min_audio_seconds=1.0)
    jobs.add_task_args(p)
    args = p.parse_args(argv)
    args.model = bool(args.load or args.random_init)
    if args.model:
        check_model_args(p, args, need_codec=True)
    jobs.check_decoding_args(p, args)
    if args.critic_model and args.critic_file:
        p.error("give one critic: --critic-model or --critic-file")
    if args.critic_model and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        p.error("the --critic-model critic runs in one process: run it as its own command without the model flags "
                "(see --help), not under a multi-rank launch")
    if "{plan}" not in args.critic_template or "{caption}" not in args.critic_template:
        p.error("--critic-template must contain {plan} and {caption}")
    if min(args.batch_size, args.critic_batch_size, args.critic_max_new_tokens) < 1:
        p.error("--batch-size, --critic-batch-size and --critic-max-new-tokens must be >= 1")
    for flag, path in [("--input", f) for f in args.input] + [
            ("--tokenizer", args.tokenizer), ("--codec", args.codec), ("--load", args.load),
            ("--critic-model", args.critic_model), ("--critic-file", args.critic_file), ("--audio-root", args.audio_root)]:
        if path and not os.path.exists(path):
            p.error(f"{flag} {path} does not exist")
    jobs.resolve_outer_task(p, args)
    return args


def run(args) -> None:
    """Runs the stages the flags and the files allow, then assembles or says what is left."""
    plans = read_plans(args.input, args.audio_root)
    digest = hashlib.sha256(json.dumps([(r.id, r.rec) for r in plans], sort_keys=True).encode()).hexdigest()[:16]
    made = {stem: jobs.read_journals(args.out, stem) for stem in (FIRST, CRITIQUES, REFINED)}
    jobs.check_run(args.out, {"inputs": digest}, started=any(made.values()))
    launch = None
    if args.model:
        from megatron_ualm import api

        jobs.check_run(args.out, {"model": jobs.model_identity(args), "write_wavs": args.write_wavs}, "model.json",
                    started=bool(made[FIRST] or made[REFINED]))
        launch = jobs.start_launch(args)
        model: list = []

        def ualm():  # loaded once, by the first stage with work anywhere in the launch
            if not model:
                from megatron_ualm.inference.checkpoint import build_ualm

                model.append(build_ualm(args))
            return model[0]

        done = jobs.done_items(launch, args.out, FIRST)
        if any(jobs.task_groups(len(plans), args.batch_size, t, done) for t in launch.tasks):
            first_pass(args, launch, ualm, plans, done)
        first = jobs.journals_on_every_rank(args.out, FIRST)
    else:
        first = jobs.read_journals(args.out, FIRST)
    complete = all(r.index in first for r in plans)
    if complete and (launch is None or launch.rank == 0):
        n = write_requests(args.out, plans, first)
        if n is not None:
            print(f"{n} record(s) for a critic in {os.path.join(args.out, 'critic_requests.jsonl')}", flush=True)
    if complete and args.critic_model:
        run_critic(args, plans, first)
    if launch is not None:
        critiques = jobs.broadcast(critiques_of(args) if launch.rank == 0 else None)
        if complete:
            done = jobs.done_items(launch, args.out, REFINED)
            if any(needs_refine(r, first, critiques) and r.index not in done for r in plans):
                refine(args, launch, ualm, plans, first, critiques, done)
        refined = jobs.journals_on_every_rank(args.out, REFINED)
    else:
        critiques, refined = critiques_of(args), jobs.read_journals(args.out, REFINED)
    if launch is None or launch.rank == 0:
        summary, left = assemble(args, plans, first, critiques, refined)
        if summary is None:
            print(f"not assembled yet: {left}", flush=True)
        else:
            skipped = ", ".join(f"{n} {SKIPS[k]}" for k, n in summary["skipped"].items() if n) or "none"
            print(f"{summary['written']} self-reflection records of {summary['records']} (skipped: {skipped}) -> "
                  f"{os.path.join(args.out, 'self_reflection.jsonl')}", flush=True)
    if launch is not None:
        api.destroy_parallel()


def build_reflection_data_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/build_reflection_data.py`` / ``ualm-build-reflection-data``."""
    return jobs.tool_main(parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(build_reflection_data_main())
