"""Evaluate UALM the way the paper does: ``python -m megatron_ualm.evaluate <task> ...``.

Tasks:
  reference      reference statistics of a folder of real clips (FD means / covariances, PaSST
                 posteriors per clip id), computed once and saved to one .npz for reuse.
  generation     text-to-audio metrics FD (OpenL3), KL (PaSST), IS (PANNs), CL (LAION-CLAP) and
                 AES (AudioBox-Aesthetics) over a folder of clips (--audio-dir), or over clips the
                 command first generates from --prompts with a checkpoint (--load; CFG, batched,
                 TP / PP under torchrun).
  understanding  MMAU / MMAR-format multiple choice about audio clips -> accuracy overall and per
                 category; every raw response is saved.
  text           MMLU-format multiple choice by log-likelihood (--mmlu) and GSM8K-format exact
                 match after generation (--gsm8k), on local JSONL files.
  tiny-backbones tiny random checkpoints of every backbone in a folder, and the flags that use
                 them, to run everything above on a CPU (README, "Evaluation on a CPU").

Each evaluation task writes <out>/results.json, <out>/results.md (Markdown table; generation columns in the
paper's order FD, KL, IS, CL, AES) and <out>/samples.csv (one row per clip / question).
Backbones load from local paths only (see README, "Evaluation"); a metric whose backbone is not
given is left out. Examples::

    python -m megatron_ualm.evaluate reference --audio-dir audiocaps_test/ --openl3-path l3/ \\
        --passt-path passt.pt --out ref/audiocaps.npz
    python -m megatron_ualm.evaluate generation --audio-dir gen/ --prompts prompts.jsonl \\
        --reference ref/audiocaps.npz --openl3-path l3/ --passt-path passt.pt --panns-path Cnn14_16k.pth \\
        --clap-path clap-htsat-fused/ --aesthetics-path aes/checkpoint.pt --out results/gen
    torchrun --nproc-per-node 2 -m megatron_ualm.evaluate generation --load ckpt --tokenizer tok/ \\
        --codec xcodec/ --tensor-model-parallel-size 2 --prompts prompts.jsonl --reference ref/audiocaps.npz ...
    python -m megatron_ualm.evaluate understanding --data mmau_test.jsonl --load ckpt --tokenizer tok/ --out results/mmau
    python -m megatron_ualm.evaluate text --mmlu mmlu.jsonl --gsm8k gsm8k.jsonl --load ckpt --tokenizer tok/ --out results/text
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from megatron_ualm.launch import program_name

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

BACKBONE_FLAGS = {
    "clap": "LAION-CLAP: a transformers folder (ClapModel + ClapProcessor), e.g. a local copy of laion/clap-htsat-fused",
    "openl3": "OpenL3 (torchopenl3) weights: torchopenl3_mel256_env_512.pth.tar, or a folder with model.pt + config.json",
    "passt": "PaSST weights: passt-s-f128-p16-s10-ap.476-swa.pt, or a folder with model.pt + config.json",
    "panns": "PANNs Cnn14 16 kHz weights: Cnn14_16k_mAP=0.438.pth, or a folder with model.pt + config.json",
    "aesthetics": "AudioBox-Aesthetics checkpoint.pt (or its folder)",
}


def _add_backbones(p: argparse.ArgumentParser, names=tuple(BACKBONE_FLAGS)) -> None:
    g = p.add_argument_group("backbones (local paths; a metric is computed when its backbone is given)")
    for name in names:
        g.add_argument(f"--{name}-path", help=BACKBONE_FLAGS[name])
    g.add_argument("--fd-backbones", nargs="+", default=["openl3"], choices=["openl3", "panns", "clap"],
                   help="backbones to compute FD on (openl3 is the paper's FD; panns / clap add FD_panns / FD_clap)")
    g.add_argument("--openl3-hop", type=float, default=0.5, help="OpenL3 analysis hop in seconds")
    g.add_argument("--device", help="torch device for the backbones (default: the GPU if any)")
    g.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron_ualm", "eval_features"),
                   help="per-file backbone outputs are cached here (keyed by path, size, mtime and backbone identity)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    from megatron_ualm.inference.checkpoint import add_model_args

    p = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True,
                           metavar="{reference,generation,understanding,text,tiny-backbones}")

    r = sub.add_parser("reference", help="reference statistics of real clips (saved once, reused)")
    r.add_argument("--audio-dir", required=True, help="folder of reference clips (id = file stem)")
    r.add_argument("--out", required=True, help="output .npz")
    _add_backbones(r, ("openl3", "passt", "panns", "clap"))

    g = sub.add_parser("generation", help="FD / KL / IS / CL / AES of generated clips",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--audio-dir", help="folder of generated clips (id = file stem); or generate them with --load")
    g.add_argument("--prompts", help='JSONL of {"id", "prompt"}: the CLAP texts, and the prompts to generate from')
    g.add_argument("--reference", help="reference statistics .npz (from the reference task)")
    g.add_argument("--reference-dir", help="folder of reference clips: statistics computed now and saved to "
                                           "<out>/reference_stats.npz")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--name", default="UALM", help="system name in the Markdown table")
    _add_backbones(g)
    add_model_args(g)
    d = g.add_argument_group("decoding (when generating)")
    d.add_argument("--cfg-weight", type=float, default=3.0, help="classifier-free guidance weight (paper: 3)")
    d.add_argument("--audio-temperature", type=float, default=0.8, help="codebook temperature (paper: 0.8)")
    d.add_argument("--audio-top-k", type=int, default=20, help="codebook top-k (paper: 20)")
    d.add_argument("--max-audio-seconds", type=float, default=10.0)
    d.add_argument("--min-audio-seconds", type=float, default=None,
                   help="the model may end a clip only after this long (default: --max-audio-seconds, i.e. "
                        "fixed-length clips like the 10 s test-set clips)")

    u = sub.add_parser("understanding", help="MMAU / MMAR-format accuracy")
    u.add_argument("--data", required=True, help="JSONL of {id, audio, question, choices, answer, category}")
    u.add_argument("--out", required=True, help="output folder")
    u.add_argument("--max-new-tokens", type=int, default=32, help="reply length limit")
    u.add_argument("--limit", type=int, help="evaluate the first N questions only")
    add_model_args(u)

    t = sub.add_parser("text", help="MMLU-format log-likelihood multiple choice, GSM8K-format exact match")
    t.add_argument("--mmlu", help="JSONL of {question, choices, answer, subject}")
    t.add_argument("--gsm8k", help='JSONL of {question, answer} with the gold number after "####"')
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--max-new-tokens", type=int, default=512, help="GSM8K reply length limit")
    t.add_argument("--limit", type=int, help="evaluate the first N questions of each file only")
    add_model_args(t)

    b = sub.add_parser("tiny-backbones", help="tiny random checkpoints of every backbone, to run the evaluation "
                                              "end to end on a CPU (the scores mean nothing)")
    b.add_argument("out", help="folder to write them to (one subfolder per backbone)")
    b.add_argument("--seed", type=int, default=0)

    args = p.parse_args(argv)
    _check(p, args)
    return args


# FD (OpenL3; PANNs or CLAP with --fd-backbones) and KL (PaSST) compare with reference clips.
_NEEDS_REFERENCE = {"openl3": "FD", "passt": "KL"}


def _check(p: argparse.ArgumentParser, args) -> None:
    from megatron_ualm.inference.checkpoint import check_model_args

    if args.task in ("reference", "generation"):
        from megatron_ualm.evaluation.backbones import check_backbone_paths

        if not any(getattr(args, f"{n}_path", None) for n in BACKBONE_FLAGS):
            p.error("give at least one backbone path (--openl3-path, --passt-path, --panns-path, --clap-path, "
                    "--aesthetics-path); python -m megatron_ualm.evaluate tiny-backbones DIR writes tiny random ones")
        try:  # every path, before a model loads or a clip is generated
            check_backbone_paths({n: getattr(args, f"{n}_path", None) for n in BACKBONE_FLAGS})
        except (OSError, ValueError) as err:
            p.error(str(err))
    if args.task == "generation":
        if bool(args.audio_dir) == bool(args.load or args.random_init):
            p.error("give either --audio-dir (evaluate existing clips) or --load / --random-init (generate them first)")
        if not args.audio_dir:
            if not args.prompts:
                p.error("generating clips needs --prompts")
            check_model_args(p, args, need_codec=True)
        if args.reference and args.reference_dir:
            p.error("give --reference or --reference-dir, not both")
        needs = {_NEEDS_REFERENCE.get(n, f"FD_{n}") for n in BACKBONE_FLAGS if getattr(args, f"{n}_path", None)
                 and (n == "passt" or n in args.fd_backbones)}
        if needs and not (args.reference or args.reference_dir):
            flags = sorted(f"--{n}-path" for n in BACKBONE_FLAGS if getattr(args, f"{n}_path", None)
                           and (n == "passt" or n in args.fd_backbones))
            p.error(f"{' and '.join(sorted(needs))} compare the clips with reference clips: give --reference REF.npz "
                    "(python -m megatron_ualm.evaluate reference ...) or --reference-dir DIR of real clips, or leave "
                    f"out {', '.join(flags)} (IS, CL and AES need no reference)")
    if args.task == "understanding":
        check_model_args(p, args)
    if args.task == "text":
        if not args.mmlu and not args.gsm8k:
            p.error("give --mmlu FILE and/or --gsm8k FILE")
        check_model_args(p, args)
    for name in ("audio_dir", "reference_dir"):
        path = getattr(args, name, None)
        if path and not os.path.isdir(path):
            p.error(f"--{name.replace('_', '-')} {path} is not a folder")
    if getattr(args, "reference_dir", None):
        from megatron_ualm.evaluation.tta import list_clips

        try:
            list_clips(args.reference_dir)
        except ValueError as err:
            p.error(f"--reference-dir: {err}")
    for name in ("prompts", "reference", "data", "mmlu", "gsm8k"):
        path = getattr(args, name, None)
        if path and not os.path.isfile(path):
            p.error(f"--{name} {path} does not exist")
    if getattr(args, "reference", None):
        from megatron_ualm.evaluation.tta import ReferenceStats

        try:
            ReferenceStats.load(args.reference)
        except (OSError, ValueError, KeyError) as err:
            p.error(f"--reference {args.reference} is not reference statistics of the reference task ({err})")


def run_tiny_backbones(args) -> None:
    from megatron_ualm.tiny.backbones import write_all

    paths = write_all(args.out, args.seed)
    flags = " ".join(f"--{name}-path {path}" for name, path in paths.items())
    from megatron_ualm.files import atomic_write

    atomic_write(os.path.join(args.out, "flags.txt"), flags + "\n")
    print(flags)
    _log(f"wrote tiny random backbones to {args.out} (random weights: every metric runs, no score means anything); "
         f"their flags are in {os.path.join(args.out, 'flags.txt')}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _backbones(args, names=tuple(BACKBONE_FLAGS)):
    from megatron_ualm.evaluation.tta import FeatureCache, load_backbones

    paths = {n: getattr(args, f"{n}_path", None) for n in names}
    models = load_backbones(paths, device=args.device, openl3={"hop_seconds": args.openl3_hop})
    return models, FeatureCache(None if args.no_cache else args.cache_dir)


def run_reference(args) -> None:
    from megatron_ualm.evaluation.tta import compute_reference, list_clips

    models, cache = _backbones(args, ("openl3", "passt", "panns", "clap"))
    stats = compute_reference(list_clips(args.audio_dir), models, cache, args.fd_backbones, source=os.path.abspath(args.audio_dir))
    stats.save(args.out)
    _log(f"wrote reference statistics of {stats.num_clips} clips ({', '.join(sorted(stats.identities))}) to {args.out}")


def _generate_clips(args) -> tuple[str, bool]:
    """Decodes every prompt to audio (all ranks), writes ``<out>/audio/<id>.wav`` (rank 0).

    Returns:
        ``(folder, whether this rank wrote it)``; the process group is gone afterwards.
    """
    from megatron_ualm import api
    from megatron_ualm.evaluation.tta import read_prompts
    from megatron_ualm.evaluation.runner import respond_batches
    from megatron_ualm.inference.checkpoint import build_ualm, is_writer
    from megatron_ualm.inference import GREEDY, GenerationParams, Turn, write_wav
    from megatron_ualm.inference.sampling import SamplingParams

    prompts = read_prompts(args.prompts)
    ualm = build_ualm(args)
    if ualm.codec is None:
        raise SystemExit("error: generating audio needs --codec")
    params = GenerationParams(text=GREEDY, audio=SamplingParams(args.audio_temperature, args.audio_top_k),
                              cfg_weight=args.cfg_weight, max_audio_seconds=args.max_audio_seconds,
                              min_audio_seconds=args.max_audio_seconds if args.min_audio_seconds is None
                              else args.min_audio_seconds, stop_at_eot=True, seed=args.seed)
    ids = list(prompts)
    replies = respond_batches(ualm, [[Turn("user", text=prompts[i])] for i in ids], params, "audio", args.batch_size,
                              desc="generating", unit="clip")
    folder, writer = os.path.join(args.out, "audio"), is_writer()
    if writer:
        for i, reply in zip(ids, replies):
            if reply.waves and reply.waves[0].size:
                write_wav(os.path.join(folder, f"{i}.wav"), reply.waves[0], reply.sample_rate)
            else:
                _log(f"warning: prompt {i!r} produced no audio (left out of the metrics)")
    api.destroy_parallel()
    return folder, writer


def run_generation(args) -> None:
    from megatron_ualm.evaluation.tta import (ReferenceStats, compute_reference, evaluate_clips, list_clips,
                                                     read_prompts)
    from megatron_ualm.evaluation.report import write_reports

    audio_dir, writer = (args.audio_dir, True) if args.audio_dir else _generate_clips(args)
    if not writer:
        return
    models, cache = _backbones(args)
    prompts = read_prompts(args.prompts) if args.prompts else None
    reference = None
    if args.reference:
        reference = ReferenceStats.load(args.reference)
    elif args.reference_dir:
        reference = compute_reference(list_clips(args.reference_dir), models, cache, args.fd_backbones,
                                      source=os.path.abspath(args.reference_dir))
        reference.save(os.path.join(args.out, "reference_stats.npz"))
    res = evaluate_clips(list_clips(audio_dir), models, reference, prompts, cache, args.fd_backbones, log=_log)
    results = {"task": "generation", "metrics": res.metrics, "notes": res.notes, "audio_dir": os.path.abspath(audio_dir),
               "reference": args.reference or args.reference_dir, "backbones": {n: m.identity for n, m in models.items()}}
    paths = write_reports(args.out, args.name, results, res.rows)
    sys.stdout.write(open(paths["markdown"]).read())
    _log(f"wrote {paths['json']}, {paths['markdown']}, {paths['csv']}")


def _write_task(args, results: dict, rows: list, table: dict, columns: list) -> None:
    from megatron_ualm.evaluation.report import write_reports

    paths = write_reports(args.out, "UALM", results, rows, table, columns)
    sys.stdout.write(open(paths["markdown"]).read())
    _log(f"wrote {paths['json']}, {paths['markdown']}, {paths['csv']}")


def run_understanding(args) -> None:
    from megatron_ualm import api
    from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, load_audio
    from megatron_ualm.evaluation.runner import respond_batches
    from megatron_ualm.inference.checkpoint import build_ualm, is_writer
    from megatron_ualm.evaluation.understanding import question_text, read_records, score_responses
    from megatron_ualm.inference import GREEDY, GenerationParams, Turn

    records = read_records(args.data)[: args.limit]
    missing = [r.id for r in records if not r.audio or not os.path.isfile(r.audio)]
    if missing:
        raise SystemExit(f"error: {args.data}: the audio of {len(missing)} questions is missing, e.g. id {missing[0]!r}")
    ualm = build_ualm(args)
    params = GenerationParams(text=GREEDY, cfg_weight=None, max_new_tokens=args.max_new_tokens, max_audio_segments=0,
                              stop_at_eot=True, seed=args.seed)
    conversations = [[Turn("user", audio=load_audio(r.audio, AUDIO_IN_SAMPLE_RATE, field="audio"),
                           sample_rate=AUDIO_IN_SAMPLE_RATE), Turn("user", text=question_text(r))] for r in records]
    replies = respond_batches(ualm, conversations, params, "text", args.batch_size, desc="answering", unit="question")
    writer = is_writer()
    api.destroy_parallel()
    if not writer:
        return
    summary, rows = score_responses(records, [r.text for r in replies])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "responses.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    table = {"accuracy": summary["accuracy"], **{c: v["accuracy"] for c, v in summary["per_category"].items()}}
    _write_task(args, {"task": "understanding", "data": os.path.abspath(args.data), **summary}, rows, table,
                ["accuracy", *summary["per_category"]])


def run_text(args) -> None:
    from megatron_ualm import api
    from megatron_ualm.evaluation import text as text_eval
    from megatron_ualm.evaluation.runner import first_token_logits, respond_batches
    from megatron_ualm.inference.checkpoint import build_ualm, is_writer
    from megatron_ualm.evaluation.understanding import read_records
    from megatron_ualm.inference import GREEDY, GenerationParams, Turn

    mmlu = read_records(args.mmlu)[: args.limit] if args.mmlu else None
    gsm8k = text_eval.read_gsm8k(args.gsm8k)[: args.limit] if args.gsm8k else None
    ualm = build_ualm(args)
    writer = is_writer()
    results, rows, table = {"task": "text"}, [], {}
    if mmlu:
        letters = text_eval.letter_token_ids(ualm.tokenizer, max(len(r.choices) for r in mmlu))
        logits = first_token_logits(ualm, [[Turn("user", text=text_eval.mc_prompt(r))] for r in mmlu], args.batch_size,
                                    desc="mmlu")
        if writer:
            summary, mc_rows = text_eval.score_multiple_choice(mmlu, logits, letters)
            results["mmlu"] = summary
            table["MMLU"] = summary["accuracy"]
            rows += [{"benchmark": "mmlu", **r} for r in mc_rows]
    if gsm8k:
        params = GenerationParams(text=GREEDY, cfg_weight=None, max_new_tokens=args.max_new_tokens, max_audio_segments=0,
                                  stop_at_eot=True, seed=args.seed)
        replies = respond_batches(ualm, [[Turn("user", text=f"{r['question']}\n{text_eval.GSM8K_INSTRUCTION}")] for r in gsm8k],
                                  params, "text", args.batch_size, desc="gsm8k", unit="question")
        summary, em_rows = text_eval.score_exact_match(gsm8k, [r.text for r in replies])
        results["gsm8k"] = summary
        table["GSM8K"] = summary["exact_match"]
        rows += [{"benchmark": "gsm8k", **r} for r in em_rows]
    api.destroy_parallel()
    if writer:
        _write_task(args, results, rows, table, list(table))


def main(argv: Optional[list] = None) -> None:
    from megatron_ualm.compat import quiet

    quiet.install()  # before Megatron-Core is imported: its fallback warnings become one line
    args = parse_args(argv)
    try:
        {"reference": run_reference, "generation": run_generation, "understanding": run_understanding,
         "text": run_text, "tiny-backbones": run_tiny_backbones}[args.task](args)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
