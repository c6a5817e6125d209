"""Logits of a HF ``Qwen2ForCausalLM`` directory on saved tokens, in a clean process.

Run outside pytest's process because the CPU shims installed there (``compat.cpu``) wrap the
torch factories, which hides them from ``transformers``' meta-device loading: non-persistent
buffers such as the RoPE ``inv_freq`` then stay uninitialised after ``from_pretrained``.
"""

import sys

import torch
from transformers import Qwen2ForCausalLM

if __name__ == "__main__":
    model_dir, tokens_path, out_path = sys.argv[1:4]
    model = Qwen2ForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.save(model(torch.load(tokens_path)).logits, out_path)
