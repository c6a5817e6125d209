"""Generation speed: audio seconds generated per second and text tokens per second.

Audio: text-to-audio replies of fixed length (``--audio-seconds``, 50 Hz x K codebooks under
the delay pattern, so ``T + K - 1`` decode steps), with classifier-free guidance (the batch
runs 2B rows) unless ``--no-cfg``. Text: replies of up to ``--text-tokens`` ids. Each at every
``--batch-sizes`` entry, after one warm-up run, the median of ``--repeats`` runs, prefill
included. Random weights: speed does not depend on them.

CPU (debug)::

    python benchmarks/generation.py --flavor debug --batch-sizes 1 16

GPU (real shapes)::

    python benchmarks/generation.py --flavor qwen2.5-1.5b --bf16 --audio-seconds 10 --batch-sizes 1 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--num-layers", type=int,
                   help="override the flavor's layer count (debug width + 28 layers = the host-side cost of "
                        "a Qwen2.5-1.5B decode step without its GPU work)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--audio-seconds", type=float, default=2.0)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--cfg-weight", type=float, default=3.0)
    p.add_argument("--no-cfg", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="decoder backend (TE's causal attention ignores the padding mask CFG needs)")
    p.add_argument("--static-cache", action="store_true", help="fixed-shape KV cache (inference/static_cache.py)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the decode step as a CUDA graph (GPU, local spec; implies --static-cache)")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from megatron_ualm import api
    from megatron_ualm.data.sequence import Message
    from megatron_ualm.inference import GenerationParams, Generator, SamplingParams, build_prompt

    api.initialize_parallel()
    overrides = dict(bf16=True) if args.bf16 else {}
    overrides["transformer_impl"] = args.transformer_impl
    if args.num_layers:
        overrides["num_layers"] = args.num_layers
    budget = args.prompt_tokens + 16 + max(args.text_tokens, int(args.audio_seconds * 50) + 16)
    overrides["max_sequence_length"] = max(budget, 512)
    model = api.build_model(args.flavor, **overrides).eval()
    gen = Generator(model)
    v, K = gen.vocab, model.config.num_codebooks
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def prompts(b, modality):
        g = torch.Generator().manual_seed(0)
        return [build_prompt([Message("user", "text", text=torch.randint(0, v.text_vocab_size, (args.prompt_tokens,), generator=g).tolist())],
                             v, modality=modality) for _ in range(b)]

    def timed(batch, params):
        times, out = [], None
        for i in range(args.repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = gen.generate(batch, params)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first run warms up
                times.append(time.perf_counter() - t)
        return statistics.median(times), out

    audio_params = GenerationParams(
        audio=SamplingParams(temperature=1.0, top_k=250), cfg_weight=None if args.no_cfg else args.cfg_weight,
        max_audio_seconds=args.audio_seconds, min_audio_seconds=args.audio_seconds, stop_at_eot=True,
        max_new_tokens=1, max_audio_segments=1, static_cache=args.static_cache, cuda_graphs=args.cuda_graphs)
    text_params = GenerationParams(text=SamplingParams(temperature=1.0), cfg_weight=None,
                                   max_new_tokens=args.text_tokens, max_audio_segments=0,
                                   static_cache=args.static_cache, cuda_graphs=args.cuda_graphs)
    if args.cuda_graphs:
        # The replayed step must decode what the same step decodes eagerly: a short greedy run of
        # both, scores compared, before any timing.
        import dataclasses

        check = dataclasses.replace(audio_params, text=SamplingParams(0.0), audio=SamplingParams(0.0),
                                    max_audio_seconds=0.4, min_audio_seconds=0.4, output_scores=True)
        eager = gen.generate(prompts(2, "audio"), dataclasses.replace(check, cuda_graphs=False, static_cache=True))
        graph = gen.generate(prompts(2, "audio"), check)
        same = sum(torch.equal(a.codes, b.codes) for a, b in zip(eager, graph))
        diff = max(float((x[1] - y[1]).abs().max()) for a, b in zip(eager, graph) for x, y in zip(a.scores, b.scores))
        print(f"CUDA-graph check: {same}/{len(eager)} rows decode the same codes as eager; "
              f"max |code logit difference| = {diff:.3g}")
    results = []
    for b in args.batch_sizes:
        sec, out = timed(prompts(b, "audio"), audio_params)
        frames = sum(c.shape[1] for g in out for c in g.audio)
        audio_s = frames / model.config.codec_frame_rate
        steps = max(len(g.tokens) for g in out)
        results.append(dict(kind="audio", batch=b, cfg=not args.no_cfg, seconds=sec, audio_seconds=audio_s,
                            audio_s_per_s=audio_s / sec, steps_per_s=steps / sec, realtime_x=audio_s / sec))
        sec, out = timed(prompts(b, "text"), text_params)
        toks = sum(len(g.tokens) for g in out)
        steps = max(len(g.tokens) for g in out)
        results.append(dict(kind="text", batch=b, seconds=sec, tokens=toks, tokens_per_s=toks / sec,
                            steps_per_s=steps / sec))

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU x{args.threads} thread(s)"
    cache = "cuda-graphs" if args.cuda_graphs else "static" if args.static_cache else "megatron"
    print(f"flavor={args.flavor} layers={model.config.num_layers} device={name} bf16={args.bf16} "
          f"impl={model.config.transformer_impl} kv-cache={cache} "
          f"prompt={args.prompt_tokens} tokens, audio={args.audio_seconds} s, K={K}")
    print("| kind | batch | CFG | wall s | audio s / s (x real time) | text tokens / s | ms / decode step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ms = 1000 / r["steps_per_s"]
        if r["kind"] == "audio":
            print(f"| audio | {r['batch']} | {'w=%g' % args.cfg_weight if r['cfg'] else 'off'} | {r['seconds']:.2f} | "
                  f"{r['audio_s_per_s']:.2f} | | {ms:.1f} |")
        else:
            print(f"| text | {r['batch']} | off | {r['seconds']:.2f} | | {r['tokens_per_s']:.1f} | {ms:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(flavor=args.flavor, device=name, bf16=args.bf16, kv_cache=cache, results=results), f, indent=2)


if __name__ == "__main__":
    main()
