"""Cost of a DPO step against an SFT step over the same rows, and the memory of the reference.

One micro-batch of ``--pairs`` synthetic preference pairs (text-to-audio, audio
understanding, caption + audio; ``2 * pairs`` rows of ``--seq-length``) goes through
Megatron's schedule (forward + backward) and an Adam step, three ways:

- ``sft``: the rows with the pretraining loss (cross-entropy on the responses);
- ``dpo precomputed``: the same rows with the DPO loss and stored reference log-probs (the
  default of ``python -m megatron_ualm.dpo``);
- ``dpo model``: a frozen reference model scores the rows first (forward only), then the DPO
  step (``--reference model``).

It prints the median step time of each (the three take turns), the DPO / SFT ratio (target: at most 2.1x with
precomputed reference log-probs), the one-time cost of the reference pass per pair, and the
parameters held by model objects in each mode (target: no second model with precomputed
log-probs; counted over every live ``UALMModel``). Run on one device::

    python benchmarks/dpo_step.py                         # CPU, debug flavor
    python benchmarks/dpo_step.py --flavor qwen2.5-0.5b --seq-length 2048 --pairs 2 --bf16   # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import warnings
from functools import partial

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavor", default="debug")
    p.add_argument("--num-layers", type=int, default=None, help="override the flavor's layer count")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (rows = 2 x pairs)")
    p.add_argument("--steps", type=int, default=20, help="timed rounds (one step of each kind per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(steps: dict, warmup: int, rounds: int) -> dict:
    """Median seconds per call of each ``steps[name]()``, the kinds taking turns each round so
    that drift in a shared machine's load hits them alike."""
    times = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def live_model_parameters() -> tuple[int, int]:
    """(UALMModel objects alive, parameters they hold)."""
    from megatron_ualm.models.ualm_model import UALMModel

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some live objects (lazy modules) warns
        warnings.simplefilter("ignore")
        models = [o for o in gc.get_objects() if isinstance(o, UALMModel)]
    return len(models), sum(p.numel() for m in models for p in m.parameters())


def main() -> None:
    args = parse_args()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ualm import api
    from megatron_ualm.config import make_config
    from megatron_ualm.posttraining.dpo_loss import DPOConfig, dpo_forward_step, score_batches
    from megatron_ualm.synthetic import synthetic_pair_batch

    api.initialize_parallel()
    overrides = dict(use_cpu_initialization=not torch.cuda.is_available(), bf16=args.bf16)
    if args.num_layers:
        overrides["num_layers"] = args.num_layers
    config = make_config(args.flavor, **overrides)
    policy = api.build_model(config)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    def pairs():
        b = synthetic_pair_batch(config, args.seq_length, args.pairs, seed=0)
        if args.bf16 and b.rows.audio_in_features is not None:  # no Float16Module here: the encoder reads bf16
            b.rows.audio_in_features = b.rows.audio_in_features.to(torch.bfloat16)
        return b

    batch = pairs()
    rows = 2 * args.pairs
    schedule = get_forward_backward_func()

    def step(forward_step, micro_batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        schedule(forward_step_func=forward_step, data_iterator=iter([micro_batch]), model=policy, num_microbatches=1,
                 seq_length=args.seq_length, micro_batch_size=rows, forward_only=False)
        optimizer.step()

    # The reference pass: once per pair, forward only, with the policy itself (precomputed mode).
    sync()
    start = time.perf_counter()
    batch.reference = score_batches(policy, [batch], args.seq_length)[0].view(args.pairs, 2, -1)
    sync()
    reference_pass = time.perf_counter() - start
    models_precomputed = live_model_parameters()

    dpo = partial(dpo_forward_step, DPOConfig(beta=0.1, sft_loss_weight=1.0))

    # A frozen reference beside the policy: a second model, and a reference forward each step.
    reference = api.build_model(config)
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    models_frozen = live_model_parameters()
    frozen_batch = pairs()

    def with_frozen_reference() -> None:
        frozen_batch.reference = score_batches(reference, [frozen_batch], args.seq_length)[0].view(args.pairs, 2, -1)
        step(dpo, frozen_batch)

    results = time_interleaved({"sft": lambda: step(api.forward_step, batch.rows),
                                "dpo precomputed": lambda: step(dpo, batch),
                                "dpo model": with_frozen_reference}, args.warmup, args.steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    tokens = rows * args.seq_length
    print(f"{device}, flavor {args.flavor}{'' if not args.num_layers else f' ({args.num_layers} layers)'}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.pairs} pairs = {rows} rows x {args.seq_length}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'step':<18}{'ms':>10}{'x SFT':>9}{'tokens/s':>12}")
    for name, seconds in results.items():
        print(f"{name:<18}{1e3 * seconds:>10.1f}{seconds / results['sft']:>9.2f}{tokens / seconds:>12,.0f}")
    print(f"reference pass (precomputed, once): {1e3 * reference_pass / args.pairs:.1f} ms per pair")
    print(f"models held: precomputed {models_precomputed[0]} ({models_precomputed[1]:,} parameters), "
          f"frozen reference {models_frozen[0]} ({models_frozen[1]:,} parameters)")
    summary = dict(device=device, flavor=args.flavor, num_layers=config.num_layers, bf16=args.bf16, pairs=args.pairs,
                   seq_length=args.seq_length, step_ms={k: 1e3 * v for k, v in results.items()},
                   dpo_over_sft=results["dpo precomputed"] / results["sft"],
                   dpo_model_over_sft=results["dpo model"] / results["sft"],
                   reference_pass_ms_per_pair=1e3 * reference_pass / args.pairs,
                   models_precomputed=models_precomputed, models_frozen_reference=models_frozen)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
