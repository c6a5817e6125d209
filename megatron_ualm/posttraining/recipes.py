"""What the CPU post-training recipes start from (``examples/post_training/*.sh``).

Builds, offline and in seconds, everything the recipes need besides the starting checkpoint
(which the recipes pretrain from the corpus with ``megatron_ualm.pretrain``):

- the quick-start corpus (``megatron_ualm.quickstart``: BPE tokenizer, tiny random X-Codec,
  synthesised tone clips, pretraining shards and blend);
- tiny random scorers (CLAP, AudioBox-Aesthetics: the real model classes, from
  ``evaluation.testing``) and a tiny random critic (``transformers`` ``Qwen2ForCausalLM`` with
  its tokenizer);
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

CRITIC_WORDS = ("the audio is missing a tone the plan asks for a longer sound it should be higher lower louder "
                "quieter add remove the beep hum whistle keep it short make it long fix the layout").split()


def write_tiny_critic(path: str, seed: int = 0) -> str:
    """A random two-layer ``Qwen2ForCausalLM`` and a BPE tokenizer, saved with ``save_pretrained``.

    Returns:
        The folder (loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``).
    """
    import numpy as np
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    corpus = [" ".join(rng.choice(CRITIC_WORDS, size=12)) for _ in range(200)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<pad>", "<eos>"],
                                                        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return path

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
    parser = argparse.ArgumentParser(prog="python -m megatron_ualm.posttraining.recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the corpus, tiny models, inputs and paths.sh go")
    parser.add_argument("--num-text", type=int, default=80, help="text records of the pretraining corpus")
    parser.add_argument("--num-clips", type=int, default=32, help="tone clips (pretraining, Reason records)")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts for the pair builder and plans")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from megatron_ualm import quickstart
    from megatron_ualm.evaluation import testing

    w = os.path.abspath(args.workdir)
    corpus = os.path.join(w, "corpus")
    if quickstart.main(["--workdir", corpus, "--num-text", str(args.num_text), "--num-clips", str(args.num_clips),
                        "--workers", "1", "--seed", str(args.seed)]) != 0:
        raise SystemExit("recipes: the quick-start corpus failed; see above")
    with open(os.path.join(corpus, "generation.jsonl")) as f:
        clips = [(os.path.join(corpus, r["audio"]), r["caption"]) for r in map(json.loads, f)]
    paths = dict(CORPUS=corpus, TOKENIZER=os.path.join(corpus, "tokenizer.json"), CODEC=os.path.join(corpus, "xcodec"),
                 PRETRAIN_BLEND=os.path.join(corpus, "blend.json"),
                 CLAP=testing.write_tiny_clap(os.path.join(w, "models", "clap"), args.seed),
                 AES=testing.write_tiny_aesthetics(os.path.join(w, "models", "aesthetics"), args.seed),
                 CRITIC=write_tiny_critic(os.path.join(w, "models", "critic"), args.seed),
                 **write_inputs(w, clips, args.num_prompts))
    with open(os.path.join(w, "paths.sh.partial"), "w") as f:
        f.writelines(f"{k}={shlex.quote(v)}\n" for k, v in paths.items())
    os.replace(os.path.join(w, "paths.sh.partial"), os.path.join(w, "paths.sh"))
    print(f"post-training inputs ready: {os.path.join(w, 'paths.sh')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
