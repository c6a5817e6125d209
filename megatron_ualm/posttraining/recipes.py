"""What the CPU post-training recipes start from (``examples/post_training/*.sh``).

Builds, offline and in seconds, everything the recipes need besides the starting checkpoint
(which the recipes pretrain from the corpus with ``megatron_ualm.pretrain``):

- the quick-start corpus (``tiny.corpus``: BPE tokenizer, tiny random X-Codec, synthesised
  tone clips, pretraining shards and blend);
- tiny random scorers (CLAP, AudioBox-Aesthetics: the real model classes, from
  ``tiny.backbones``) and a tiny random critic (``tiny.critic``: ``transformers``
  ``Qwen2ForCausalLM`` with its tokenizer);
- the post-training inputs: text-to-audio prompts (``prompts.jsonl``), UALM-Reason SFT records
  (``reason.jsonl``: enrichment and dialogue kinds over the clips) and plan records for the
  self-reflection builder (``plans.jsonl``: half with their target clip, half without);
- ``paths.sh``: shell variables naming all of it, sourced by the recipes.

Random weights make the scores and critiques meaningless; the recipes check that every stage
runs and writes what the next one reads. ::

    python -m megatron_ualm.posttraining.recipes --workdir runs/post_training/setup
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from typing import Optional, Sequence

from megatron_ualm.files import atomic_write, jsonl_text
from megatron_ualm.launch import program_name


def reason_records(clips: Sequence[tuple[str, str]]) -> list[dict]:
    """Enrichment and dialogue records (alternating) over ``(clip path, caption)`` pairs."""
    out = []
    for i, (clip, caption) in enumerate(clips):
        words = caption.split()  # "a short high beep"
        rich = {"keywords": [" ".join(words[2:])], "layout": f"one {words[1]} sound", "description": caption}
        if i % 2:
            out.append({"kind": "dialogue", "prompt": "make a sound", "rich_caption": rich, "audio": clip,
                        "turns": [{"question": "short or long?", "answer": words[1]}]})
        else:
            out.append({"kind": "enrichment", "prompt": " ".join(words[2:]), "rich_caption": rich, "audio": clip})
    return out


def write_inputs(workdir: str, clips: Sequence[tuple[str, str]], num_prompts: int) -> dict:
    """``prompts.jsonl``, ``reason.jsonl`` and ``plans.jsonl`` over the corpus clips; returns their paths."""
    def jsonl(name, rows):
        return atomic_write(os.path.join(workdir, name), jsonl_text(rows))

    captions = sorted({c for _, c in clips})
    reason = reason_records(clips)
    plans = [{"id": f"plan{i:03d}", "prompt": r["prompt"], "rich_caption": r["rich_caption"],
              **({"audio": r["audio"]} if i % 2 == 0 else {})} for i, r in enumerate(reason[:num_prompts])]
    return dict(
        PROMPTS=jsonl("prompts.jsonl", [{"id": f"p{i:03d}", "prompt": captions[i % len(captions)]}
                                        for i in range(num_prompts)]),
        REASON=jsonl("reason.jsonl", reason),
        REASON_PROMPTS=jsonl("reason_prompts.jsonl", [r for r in reason if r["kind"] == "enrichment"][:num_prompts]),
        PLANS=jsonl("plans.jsonl", plans))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=program_name(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the corpus, tiny models, inputs and paths.sh go")
    parser.add_argument("--num-text", type=int, default=80, help="text records of the pretraining corpus")
    parser.add_argument("--num-clips", type=int, default=32, help="tone clips (pretraining, Reason records)")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts for the pair builder and plans")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from megatron_ualm.compat import quiet
    from megatron_ualm.tiny import backbones, corpus as tiny_corpus
    from megatron_ualm.tiny.critic import write_tiny_critic

    quiet.install()
    w = os.path.abspath(args.workdir)
    corpus = os.path.join(w, "corpus")
    try:
        tiny_corpus.build(corpus, args.num_text, args.num_clips, workers=1, seed=args.seed)
    except RuntimeError as err:
        raise SystemExit(f"recipes: the quick-start corpus failed: {err}") from None
    with open(os.path.join(corpus, "generation.jsonl")) as f:
        clips = [(os.path.join(corpus, r["audio"]), r["caption"]) for r in map(json.loads, f)]
    paths = dict(CORPUS=corpus, TOKENIZER=os.path.join(corpus, "tokenizer.json"), CODEC=os.path.join(corpus, "xcodec"),
                 PRETRAIN_BLEND=os.path.join(corpus, "blend.json"),
                 CLAP=backbones.write_tiny_clap(os.path.join(w, "models", "clap"), args.seed),
                 AES=backbones.write_tiny_aesthetics(os.path.join(w, "models", "aesthetics"), args.seed),
                 CRITIC=write_tiny_critic(os.path.join(w, "models", "critic"), args.seed),
                 **write_inputs(w, clips, args.num_prompts))
    atomic_write(os.path.join(w, "paths.sh"), "".join(f"{k}={shlex.quote(v)}\n" for k, v in paths.items()))
    print(f"post-training inputs ready: {os.path.join(w, 'paths.sh')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
