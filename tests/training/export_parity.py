"""Compares the text logits of a training checkpoint with those of its Hugging Face export.

Usage: python export_parity.py CKPT_DIR HF_DIR  (prints the max abs logit difference)
"""

import sys

import torch


def main(ckpt: str, out: str) -> None:
    from megatron_ualm import api
    from megatron_ualm.inference.checkpoint import load_checkpoint

    api.initialize_parallel()
    model = api.build_model("debug")
    load_checkpoint(model, ckpt)
    model.eval()
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.text_vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    empty = torch.full((2, model.config.num_codebooks, 32), model.config.codebook_size)
    with torch.no_grad():
        ualm, _ = model(ids, empty, gather_output=True)
        reference = hf(ids).logits
    print(f"MAX_ABS_DIFF {(ualm - reference).abs().max().item():.3e}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
