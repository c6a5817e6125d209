"""Generate text and audio with a UALM model: ``python -m megatron_ualm.generate``.

Modes:
  respond   reply to each prompt; the model picks text or audio (``--modality`` fixes it);
            ``--audio FILE`` adds an audio clip the model hears (understanding).
  tta       text-to-audio: the reply is audio, with classifier-free guidance.
  enrich    prompt -> rich caption (Keywords / Layout / Description) -> audio.
  dialogue  the model may ask questions first; answers come from the prompt record's
            ``answers`` list (JSONL) or, with ``--interactive``, from stdin.
  reflect   enrichment, then ``--rounds`` of listen -> critique -> refined audio.

Prompts come from ``--prompt`` (repeatable) or ``--prompts FILE.jsonl`` (one object per line:
``{"prompt": "...", "audio": "clip.wav", "answers": ["...", ...], "id": "name"}``; only
``prompt`` is required). Outputs go to ``--out``: ``results.jsonl`` (one line per prompt: id,
texts, audio files), the WAVs, and for the reasoning modes one folder per prompt with
``transcript.json`` / ``transcript.md``.

Model parallelism: launch with ``torchrun --nproc-per-node=TP*PP ... --tensor-model-parallel-size TP
--pipeline-model-parallel-size PP``; every rank decodes the same prompts, rank 0 writes the outputs.

Example (CPU, random debug model, tiny random codec)::

    python -m megatron_ualm.generate --flavor debug --random-init --tokenizer tok.json \\
        --codec codec_dir --mode tta --prompt "rain on a tin roof" --max-audio-seconds 1 --out out/

From a checkpoint (training ``--save`` directory or converted), which describes its own model::

    python -m megatron_ualm.generate --load ckpt --tokenizer tok.json --codec codec_dir --mode tta \\
        --prompt "rain on a tin roof" --out out/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from megatron_ualm.launch import program_name

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--load", help="Megatron distributed checkpoint (a --save root or one iter_*/release dir); "
                                  "it describes its own model, so no --flavor is needed")
    m.add_argument("--flavor", help="model flavor (debug, qwen2.5-0.5b, -1.5b, -3b, -7b): required with "
                                    "--random-init, optional with --load (then checked against the checkpoint)")
    m.add_argument("--random-init", action="store_true", help="run without a checkpoint (smoke tests, benchmarks)")
    m.add_argument("--audio-encoder-path", help="local directory of the audio encoder's weights")
    m.add_argument("--tensor-model-parallel-size", type=int, default=1)
    m.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    m.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    m.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="decoder backend (default local: its attention applies the padding mask that "
                        "batches of mixed prompt lengths and CFG need; TE-trained checkpoints load into it)")
    m.add_argument("--tokenizer", required=True, help="tokenizer.json, a directory holding one, or a sentencepiece .model")
    m.add_argument("--codec", help="local X-Codec checkpoint directory (audio out -> WAV); without it codes are saved")
    m.add_argument("--codec-name", default="xcodec", help="codec registry name or package.module:ClassName")
    m.add_argument("--upsampler", help="package.module:ClassName of an upsampler hook (see inference.audio.Upsampler)")
    m.add_argument("--upsampler-path", help="checkpoint passed to the upsampler")
    g = p.add_argument_group("prompts and outputs")
    g.add_argument("--mode", choices=["respond", "tta", "enrich", "dialogue", "reflect"], default="respond")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts", help="JSONL file of prompt records")
    g.add_argument("--audio", help="audio file the model hears with every --prompt (respond mode)")
    g.add_argument("--modality", choices=["text", "audio"], help="fix the reply's first modality (respond mode)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (respond / tta)")
    g.add_argument("--rounds", type=int, default=1, help="self-reflection rounds (reflect)")
    g.add_argument("--max-questions", type=int, default=3, help="questions the model may ask (dialogue)")
    g.add_argument("--interactive", action="store_true", help="dialogue: read answers from stdin")
    s = p.add_argument_group("decoding")
    s.add_argument("--temperature", type=float, default=0.7, help="text temperature (0 = greedy)")
    s.add_argument("--top-k", type=int, default=0, help="text top-k (0 = off)")
    s.add_argument("--top-p", type=float, default=0.9, help="text nucleus mass")
    s.add_argument("--audio-temperature", type=float, default=1.0, help="codebook temperature (0 = greedy)")
    s.add_argument("--audio-top-k", type=int, default=250, help="codebook top-k (0 = off)")
    s.add_argument("--audio-top-p", type=float, default=1.0, help="codebook nucleus mass")
    s.add_argument("--cfg-weight", type=float, default=3.0, help="classifier-free guidance weight for audio")
    s.add_argument("--no-cfg", action="store_true", help="no unconditional stream")
    s.add_argument("--max-new-tokens", type=int, default=256, help="text ids per reply")
    s.add_argument("--max-audio-seconds", type=float, default=10.0)
    s.add_argument("--min-audio-seconds", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cuda-graphs", action="store_true",
                   help="replay each decode step from a CUDA graph (GPU, PP=1, local spec)")
    args = p.parse_args(argv)
    if not args.load and not args.random_init:
        p.error("give --load CHECKPOINT, or --random-init for a randomly initialised model")
    if args.random_init and not args.flavor:
        p.error("--random-init needs --flavor (a checkpoint would describe its own model)")
    for flag, path in (("--tokenizer", args.tokenizer), ("--codec", args.codec), ("--load", args.load),
                       ("--audio-encoder-path", args.audio_encoder_path), ("--prompts", args.prompts),
                       ("--audio", args.audio)):
        if path and not os.path.exists(path):
            p.error(f"{flag} {path} does not exist")
    if not args.prompt and not args.prompts:
        p.error("give --prompt TEXT or --prompts FILE.jsonl")
    if args.mode == "reflect" and not args.codec:
        p.error("--mode reflect listens to its audio: give --codec")
    if args.cuda_graphs:
        import torch

        if not torch.cuda.is_available():
            p.error("--cuda-graphs needs a GPU")
        if args.pipeline_model_parallel_size > 1 or args.transformer_impl != "local":
            p.error("--cuda-graphs runs with --pipeline-model-parallel-size 1 and --transformer-impl local")
    return args


def read_prompts(args) -> list[dict]:
    """Prompt records from the flags and the JSONL file, each with an ``id``."""
    records = [{"prompt": t, **({"audio": args.audio} if args.audio else {})} for t in args.prompt]
    if args.prompts:
        with open(args.prompts) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise SystemExit(f"{args.prompts}:{n}: not valid JSON ({err})")
                if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                    raise SystemExit(f'{args.prompts}:{n}: needs a "prompt" string, e.g. {{"prompt": "rain on a roof"}}')
                records.append(rec)
    for i, rec in enumerate(records):
        rec.setdefault("id", f"{i:04d}")
    return records


def main(argv: Optional[list] = None) -> None:
    from megatron_ualm.compat import quiet

    quiet.install()  # before Megatron-Core is imported: its fallback warnings become one line
    args = parse_args(argv)
    import dataclasses

    import torch

    from megatron_ualm import api
    from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, load_audio
    from megatron_ualm.errors import CheckpointError
    from megatron_ualm.inference import reasoning
    from megatron_ualm.inference.audio import write_wav
    from megatron_ualm.inference.checkpoint import load_ualm
    from megatron_ualm.inference.decoding import GenerationParams
    from megatron_ualm.inference.pipeline import Turn
    from megatron_ualm.inference.sampling import SamplingParams
    from megatron_ualm.vocab import VocabMismatch

    api.initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=args.seed)
    try:
        ualm = load_ualm(tokenizer=args.tokenizer, load=args.load, flavor=args.flavor, codec=args.codec,
                         codec_name=args.codec_name, bf16=args.bf16, transformer_impl=args.transformer_impl,
                         audio_encoder_path=args.audio_encoder_path, upsampler=args.upsampler,
                         upsampler_path=args.upsampler_path)
    except (CheckpointError, VocabMismatch) as err:
        raise SystemExit(f"error: {err}") from None
    params = GenerationParams(
        text=SamplingParams(args.temperature, args.top_k, args.top_p),
        audio=SamplingParams(args.audio_temperature, args.audio_top_k, args.audio_top_p),
        cfg_weight=None if args.no_cfg else args.cfg_weight,
        max_new_tokens=args.max_new_tokens,
        max_audio_seconds=args.max_audio_seconds,
        min_audio_seconds=args.min_audio_seconds,
        seed=args.seed,
        cuda_graphs=args.cuda_graphs,
    )
    writer = torch.distributed.get_rank() == 0
    records = read_prompts(args)
    os.makedirs(args.out, exist_ok=True)
    results = []

    def save_audio(name, wave, rate, codes):
        if not writer:
            return None
        if wave is not None and rate:
            return os.path.basename(write_wav(os.path.join(args.out, f"{name}.wav"), wave, rate))
        path = os.path.join(args.out, f"{name}.codes.pt")
        torch.save(codes, path)
        return os.path.basename(path)

    if args.mode in ("respond", "tta"):
        modality = "audio" if args.mode == "tta" else args.modality
        if args.mode == "tta":  # audio only: end the reply with the audio message
            params = dataclasses.replace(params, stop_at_eot=True)
        for start in range(0, len(records), args.batch_size):
            chunk = records[start:start + args.batch_size]
            conversations = []
            for rec in chunk:
                turns = []
                if rec.get("audio"):
                    turns.append(Turn("user", audio=load_audio(rec["audio"], AUDIO_IN_SAMPLE_RATE)))
                turns.append(Turn("user", text=rec["prompt"]))
                conversations.append(turns)
            for rec, reply in zip(chunk, ualm.respond(conversations, params, modality)):
                files = [save_audio(f"{rec['id']}_{k}", reply.waves[k] if reply.waves else None,
                                    reply.sample_rate, c) for k, c in enumerate(reply.codes)]
                results.append(dict(id=rec["id"], prompt=rec["prompt"], texts=reply.texts, audio=files,
                                    frames=[int(c.shape[1]) for c in reply.codes], finished=reply.finished))
    else:
        for rec in records:
            folder = os.path.join(args.out, rec["id"])
            if args.mode == "enrich":
                out = reasoning.enrichment(ualm, rec["prompt"], folder, params)
            elif args.mode == "dialogue":
                answers = list(rec.get("answers", []))

                def answer(question, answers=answers):
                    if args.interactive:
                        print(f"[{rec['id']}] model asks: {question}", flush=True)
                        return sys.stdin.readline().strip()
                    return answers.pop(0) if answers else None

                out = reasoning.dialogue(ualm, rec["prompt"], answer, folder, params, args.max_questions)
            else:
                out = reasoning.self_reflection(ualm, rec["prompt"], folder, args.rounds, params)
            file = save_audio(rec["id"], out.wave, out.sample_rate, out.codes)
            results.append(dict(id=rec["id"], prompt=rec["prompt"], caption=out.caption, parts=out.parts,
                                audio=[file], rounds=out.rounds,
                                transcript=os.path.join(rec["id"], "transcript.md")))
    if writer:
        from megatron_ualm.files import atomic_write, jsonl_text

        path = atomic_write(os.path.join(args.out, "results.jsonl"), jsonl_text(results))
        clips = sum(len(r.get("audio", [])) for r in results)
        print(f"wrote {len(results)} result{'s' * (len(results) != 1)} ({clips} clip{'s' * (clips != 1)}) "
              f"to {path}")
    api.destroy_parallel()


if __name__ == "__main__":
    main()
