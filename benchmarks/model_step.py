"""Forward+backward time of UALMModel against a plain Megatron-Core GPTModel.

Both models share the config, the layer spec (local on CPU, Transformer Engine on GPU) and
the shapes; GPTModel sees the stream-0 tokens only. For each data family the script prints
step time, tokens/s, model TFLOP/s (Megatron's formula plus the RVQ heads, adapter and
frozen-encoder forward; see megatron_ualm/flops.py), peak memory, and the UALM/GPT step-time
ratio. Run on one device (world of one)::

    python benchmarks/model_step.py                                   # CPU, debug flavor
    python benchmarks/model_step.py --flavor qwen2.5-7b --num-layers 8 --seq-length 4096 --bf16
    python benchmarks/model_step.py --flavor qwen2.5-7b --num-layers 8 --seq-length 4096 --bf16 --fp8 hybrid
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from megatron.core.models.gpt import GPTModel

from megatron_ualm import api
from megatron_ualm.config import make_config
from megatron_ualm.flops import backbone_flops_per_token, step_flops
from megatron_ualm.models.encoder import encoder_hf_config, window_geometry
from megatron_ualm.models.specs import decoder_block_spec
from megatron_ualm.synthetic import FAMILIES, mixed_batch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--num-layers", type=int, default=None, help="override the flavor's layer count")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--fp8", choices=["hybrid", "e4m3"], default=None)
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {FAMILIES}")
    p.add_argument("--skip-gpt", action="store_true", help="time UALM only")
    p.add_argument("--gpt-first", action="store_true",
                   help="time GPTModel before UALM (checks that kernel warm-up order does not bias the ratio)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, warmup: int, steps: int) -> float:
    """Mean seconds of ``step()`` over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def measure_ualm(args, config, device, results) -> None:
    """UALM fwd+bwd per data family."""
    model = api.build_model(config)
    for family in args.families.split(","):
        batch = mixed_batch(config, args.seq_length, seed=0, batch_size=args.micro_batch_size, families=(family,)).to(device)
        if batch.audio_in_features is not None and args.bf16:
            batch.audio_in_features = batch.audio_in_features.to(torch.bfloat16)

        def ualm_step():
            model.zero_grad(set_to_none=True)
            api.run_batch(model, batch).loss.backward()

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(ualm_step, args.warmup, args.steps)
        windows = 0 if batch.audio_in_features is None else batch.audio_in_features.shape[0]
        flops = step_flops(config, args.micro_batch_size, args.seq_length,
                           adapter_frames=windows * (window_geometry(config)[2] if windows else 0),
                           encoder_windows=windows, encoder_hf_config=encoder_hf_config(config) if windows else None)
        tokens = args.micro_batch_size * args.seq_length
        results[family] = dict(ualm_step_s=seconds, ualm_tokens_per_s=tokens / seconds,
                               ualm_tflops=flops.total / seconds / 1e12, ualm_peak_gib=peak_memory_gib(),
                               flops_breakdown=flops.__dict__)
        print(f"[{family:13s}] UALM step {seconds * 1e3:9.2f} ms  {tokens / seconds:10.0f} tok/s  "
              f"{flops.total / seconds / 1e12:8.3g} TFLOP/s  peak {peak_memory_gib():6.2f} GiB")


def measure_gpt(args, config, device, results) -> None:
    """Plain Megatron-Core GPTModel fwd+bwd on the stream-0 tokens, same config and spec."""
    gpt = GPTModel(
        config=config, transformer_layer_spec=decoder_block_spec(config), vocab_size=config.vocab_size,
        max_sequence_length=config.max_sequence_length, position_embedding_type="rope",
        rotary_base=int(config.rotary_base), share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
    ).to(device)
    tokens_ids = torch.randint(0, config.text_vocab_size, (args.micro_batch_size, args.seq_length), device=device)
    position_ids = torch.arange(args.seq_length, device=device).expand_as(tokens_ids)

    def gpt_step():
        gpt.zero_grad(set_to_none=True)
        loss = gpt(tokens_ids, position_ids, None, labels=tokens_ids)
        loss.sum().backward()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(gpt_step, args.warmup, args.steps)
    tokens = args.micro_batch_size * args.seq_length
    tflops = tokens * backbone_flops_per_token(config, args.seq_length) / seconds / 1e12
    results["gpt"] = dict(step_s=seconds, tokens_per_s=tokens / seconds, tflops=tflops, peak_gib=peak_memory_gib())
    print(f"[{'GPTModel':13s}] step      {seconds * 1e3:9.2f} ms  {tokens / seconds:10.0f} tok/s  "
          f"{tflops:8.3g} TFLOP/s  peak {peak_memory_gib():6.2f} GiB")


def main():
    args = parse_args()
    api.initialize_parallel()
    overrides = dict(max_sequence_length=max(args.seq_length, 512))
    if args.num_layers:
        overrides["num_layers"] = args.num_layers
    if args.bf16:
        overrides.update(bf16=True, params_dtype=torch.bfloat16)
    if args.fp8:
        overrides.update(fp8=args.fp8, fp8_recipe="delayed")
    overrides["use_cpu_initialization"] = not torch.cuda.is_available()
    config = make_config(args.flavor, **overrides)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    fp8_note = f" fp8={args.fp8}" if args.fp8 else ""
    print(f"flavor={args.flavor} layers={config.num_layers} seq={args.seq_length} mbs={args.micro_batch_size} "
          f"impl={config.transformer_impl} dtype={config.params_dtype}{fp8_note} device={torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")

    results = {}
    order = (measure_gpt, measure_ualm) if args.gpt_first else (measure_ualm, measure_gpt)
    for measure in order:
        if measure is measure_gpt and args.skip_gpt:
            continue
        measure(args, config, device, results)
    if "gpt" in results:
        for family in args.families.split(","):
            ratio = results[family]["ualm_step_s"] / results["gpt"]["step_s"]
            results[family]["step_ratio_vs_gpt"] = ratio
            print(f"  UALM/GPT step-time ratio [{family}]: {ratio:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)
    api.destroy_parallel()


if __name__ == "__main__":
    main()
