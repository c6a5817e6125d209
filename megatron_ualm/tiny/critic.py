"""A tiny random critic (a text LLM): ``transformers`` ``Qwen2ForCausalLM`` with its own BPE
tokenizer, for the self-reflection builder's CPU recipe and tests."""

from __future__ import annotations

import os

from megatron_ualm.progress import library_bars_off

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
    with library_bars_off():
        Qwen2ForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
