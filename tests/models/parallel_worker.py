"""One rank of a TP/PP equivalence run (launched by test_parallel.py through torchrun).

``reference`` (world 1): builds the debug model at TP=PP=1, runs one training step of two
micro-batches through Megatron's schedule, saves the weights and the gradients as
distributed checkpoints and the per-micro-batch loss reports.

``--objective dpo`` runs the same comparison for the DPO loss (``megatron_ualm.posttraining``):
micro-batches of synthetic preference pairs, reference log-probabilities scored first by a
forward-only pass of the same weights (so the first loss is ln 2 per pair), then the DPO step.

``parallel`` (world tp * pp): builds the model at the requested TP/PP/SP (with ``--vp``, one
chunk per virtual stage and Megatron's interleaved schedule), loads the reference weights
(dist_checkpointing reshards them), runs the same step, then loads the reference gradients
*into its own shard layout* and compares shard by shard, and compares the loss reports on the
last stage. Writes a JSON summary.
"""

import argparse
import dataclasses
import json
import os
from functools import partial

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ualm import api
from megatron_ualm.posttraining.dpo_loss import DPOConfig, dpo_forward_step, score_batches
from megatron_ualm.synthetic import synthetic_pair_batch
from megatron_ualm.synthetic import mixed_batch

SEQ, MICRO_BATCHES = 64, 2


def build(args):
    """The model chunks of this rank (one without a virtual pipeline) and their DDP wrappers."""
    vp = args.vp if args.vp > 1 else None
    api.initialize_parallel(args.tp, args.pp, seed=1234, timeout_minutes=2, virtual_pipeline_model_parallel_size=vp)
    overrides = dict(
        sequence_parallel=args.sp,
        share_embeddings_and_output_weights=args.tied,
        pipeline_dtype=torch.float32,
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
    )
    if args.recompute:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if vp:
        overrides.update(virtual_pipeline_model_parallel_size=vp)
    chunks = [api.build_model("debug", vp_stage=i if vp else None, **overrides) for i in range(vp or 1)]
    ddps = []
    for i, model in enumerate(chunks):
        model.config.finalize_model_grads_func = finalize_model_grads
        ddps.append(DistributedDataParallel(
            model.config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False),
            model,
            disable_bucketing=i > 0,
        ))
    return chunks, ddps


def objective_batches(chunks, objective):
    """The micro-batches and the forward step of an objective (``lm`` or ``dpo``)."""
    config = chunks[0].config
    if objective == "lm":
        return [mixed_batch(config, SEQ, seed=10 + i) for i in range(MICRO_BATCHES)], api.forward_step
    batches = [synthetic_pair_batch(config, SEQ, num_pairs=3, seed=10 + i) for i in range(MICRO_BATCHES)]
    scores = score_batches(chunks, batches, SEQ)  # reference = these weights: the first loss is ln 2
    if scores is not None:
        for batch, s in zip(batches, scores):
            batch.reference = s.view(batch.num_pairs, 2, -1)
    return batches, partial(dpo_forward_step, DPOConfig(beta=0.5, sft_loss_weight=0.3, length_normalization=False))


def train_step(chunks, ddps, objective="lm"):
    batches, forward_step = objective_batches(chunks, objective)
    for ddp in ddps:
        ddp.zero_grad_buffer()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        # Each chunk reads the micro-batches from its own iterator, in the same order.
        data_iterator=[iter(batches) for _ in ddps] if len(ddps) > 1 else iter(batches),
        model=ddps,
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=getattr(batches[0], "rows", batches[0]).tokens.shape[0],
        forward_only=False,
    )
    return [{k: v.tolist() for k, v in r.items()} for r in reports]


def sharded_state_dict(chunks):
    """One sharded state dict for all this rank's chunks (``chunk{i}.`` prefixes keep the
    local names apart; the sharded tensors carry their global checkpoint keys), so that one
    ``dist_checkpointing`` call sees every layer of the rank, as Megatron-LM's ``model0``,
    ``model1`` ... entries do."""
    return {f"chunk{i}.{key}": sh for i, model in enumerate(chunks) for key, sh in model.sharded_state_dict().items()}


def grad_state_dict(chunks):
    """The chunks' sharded state dict with every parameter's tensor replaced by its grad."""
    by_ptr = {p.data_ptr(): p for model in chunks for p in model.parameters() if p.requires_grad}
    out = {}
    for key, sh in sharded_state_dict(chunks).items():
        # Gated MLP weights come as a factory that saves the gate and up halves separately.
        if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)) or sh.data is None:
            continue
        param = by_ptr.get(sh.data.data_ptr())
        if param is None or param.numel() != sh.data.numel():
            continue
        out[key] = dataclasses.replace(sh, data=param.main_grad.view(sh.data.shape).clone())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["reference", "parallel"])
    p.add_argument("--dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vp", type=int, default=1, help="virtual pipeline stages (model chunks) per rank")
    p.add_argument("--sp", action="store_true")
    p.add_argument("--tied", action="store_true")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--tag", default="run")
    p.add_argument("--objective", choices=["lm", "dpo"], default="lm")
    args = p.parse_args()

    chunks, ddps = build(args)
    ref_dir = os.path.join(args.dir, ("tied" if args.tied else "untied") + ("" if args.objective == "lm" else "-" + args.objective))
    rank = torch.distributed.get_rank()

    if args.mode == "reference":
        for sub in ("model", "grads"):
            os.makedirs(os.path.join(ref_dir, sub), exist_ok=True)
        dist_checkpointing.save(sharded_state_dict(chunks), os.path.join(ref_dir, "model"))
        reports = train_step(chunks, ddps, args.objective)
        dist_checkpointing.save(grad_state_dict(chunks), os.path.join(ref_dir, "grads"))
        with open(os.path.join(ref_dir, "reports.json"), "w") as f:
            json.dump(reports, f)
        api.destroy_parallel()
        return

    loaded = dist_checkpointing.load(sharded_state_dict(chunks), os.path.join(ref_dir, "model"))
    for i, model in enumerate(chunks):
        prefix = f"chunk{i}."
        model.load_state_dict({k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}, strict=False)
    reports = train_step(chunks, ddps, args.objective)
    mine = grad_state_dict(chunks)
    template = {k: dataclasses.replace(v, data=torch.empty_like(v.data)) for k, v in mine.items()}
    reference = dist_checkpointing.load(template, os.path.join(ref_dir, "grads"))
    max_diff, max_ref = 0.0, 0.0
    for key, sh in mine.items():
        ref = reference[key]
        max_diff = max(max_diff, (sh.data - ref).abs().max().item())
        max_ref = max(max_ref, ref.abs().max().item())
    trainable = sum(1 for model in chunks for p in model.parameters() if p.requires_grad)
    stats = torch.tensor([max_diff, max_ref, float(len(mine)), float(trainable)])
    torch.distributed.all_reduce(stats[:2], op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(stats[2:], op=torch.distributed.ReduceOp.SUM)
    loss_diffs = []
    if parallel_state.is_pipeline_last_stage():
        with open(os.path.join(ref_dir, "reports.json")) as f:
            ref_reports = json.load(f)
        for got, want in zip(reports, ref_reports):
            assert set(got) == set(want), (sorted(got), sorted(want))
            for name in want:
                (gs, gn), (ws, wn) = got[name], want[name]
                assert gn == wn, f"{name}: {gn} vs {wn} supervised cells"
                loss_diffs.append(abs(gs - ws) / max(abs(ws), 1.0))
    if rank == torch.distributed.get_world_size() - 1:
        with open(os.path.join(args.dir, f"{args.tag}.json"), "w") as f:
            json.dump(dict(max_grad_diff=stats[0].item(), max_grad_ref=stats[1].item(), grads_compared=stats[2].item(),
                           trainable_params=stats[3].item(),
                           max_loss_rel_diff=max(loss_diffs), reports=reports), f)
    api.destroy_parallel()


if __name__ == "__main__":
    main()
