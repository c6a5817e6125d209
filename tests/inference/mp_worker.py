"""One rank of the model-parallel generation check (launched by test_model_parallel.py via torchrun).

``reference`` (world 1): builds the debug model, saves it as a distributed checkpoint, decodes
a mixed batch (text reply with audio in, audio with CFG, free choice) and writes the result.
``parallel`` (world = TP x PP): loads that checkpoint resharded, decodes the same batch; the
last stage's first TP rank writes (it holds the scores), every rank checks it holds the same
replies.
"""

import argparse
import dataclasses
import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state

from megatron_ualm import api
from megatron_ualm.data.sequence import Message
from megatron_ualm.inference import GenerationParams, Generator, SamplingParams, build_prompt
from megatron_ualm.inference.audio import AudioListener
from megatron_ualm.inference.checkpoint import load_checkpoint


def batch(model, vocab):
    t = np.arange(8000) / 16000
    msg, feats, lens = AudioListener(model.config).message((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32))
    return [
        build_prompt([msg, Message("user", "text", text=[5, 6, 7])], vocab, modality="text",
                     audio_in_features=feats, audio_in_lengths=lens),
        build_prompt([Message("user", "text", text=[9, 10, 11, 12, 13, 14])], vocab, modality="audio"),
        build_prompt([Message("user", "text", text=[20, 21])], vocab),
    ]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["reference", "parallel"])
    p.add_argument("--dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    api.initialize_parallel(args.tp, args.pp, seed=1234, timeout_minutes=2)
    model = api.build_model("debug", use_cpu_initialization=True).eval()
    ckpt = os.path.join(args.dir, "model")
    if args.mode == "reference":
        os.makedirs(ckpt, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    else:
        load_checkpoint(model, ckpt)
    params = GenerationParams(text=SamplingParams(temperature=1.0, top_k=40), audio=SamplingParams(temperature=1.0, top_k=20),
                              cfg_weight=3.0, max_new_tokens=10, max_audio_seconds=0.2, min_audio_seconds=0.1, seed=11,
                              output_scores=True)
    generator = Generator(model)
    out = generator.generate(batch(model, model.vocab), params)
    # The fixed-shape cache decodes the same replies under TP / PP as well.
    static = generator.generate(batch(model, model.vocab), dataclasses.replace(params, static_cache=True))
    for a, b in zip(out, static):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.codes, b.codes), "static cache differs"
    replies = [g.tokens.tolist() + g.codes.flatten().tolist() for g in out]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, replies)
    assert all(r == replies for r in everyone), "ranks disagree on the replies"
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        result = [dict(tokens=g.tokens.tolist(), codes=g.codes.tolist(),
                       first_scores=[g.scores[0][0].tolist(), g.scores[0][1].flatten().tolist()]) for g in out]
        with open(os.path.join(args.dir, f"{args.mode}_tp{args.tp}_pp{args.pp}.json"), "w") as f:
            json.dump(result, f)
    api.destroy_parallel()


if __name__ == "__main__":
    main()
