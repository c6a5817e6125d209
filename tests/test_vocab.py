import pytest
import torch

from megatron_ualm.config import NUM_RESERVED_SPECIAL_TOKENS, make_config
from megatron_ualm.vocab import SPECIAL_TOKENS, UALMVocab


def test_specials_follow_the_text_vocab_and_fit_qwen_rows():
    for flavor in ("debug", "qwen2.5-0.5b", "qwen2.5-7b"):
        v = UALMVocab.from_config(make_config(flavor))
        ids = [v.special(t) for t in SPECIAL_TOKENS]
        assert ids == list(range(v.text_vocab_size, v.text_vocab_size + len(SPECIAL_TOKENS)))
        assert v.text_vocab_size + NUM_RESERVED_SPECIAL_TOKENS <= v.vocab_size
        assert v.token_name(v.audio_in) == "<|audio_in|>"
        assert all(v.is_special(i) for i in ids) and not v.is_special(v.text_vocab_size - 1)


def test_codebook_rows_are_disjoint_per_codebook():
    v = UALMVocab(text_vocab_size=10, vocab_size=64, num_codebooks=3, codebook_size=5)
    codes = torch.tensor([[0, 4, 5], [0, 4, 5], [0, 4, 5]])  # 5 == empty
    rows = v.codebook_rows(codes)
    assert rows.tolist() == [[0, 4, 4], [5, 9, 9], [10, 14, 14]]
    assert v.code_empty == 5 and v.codebook_table_size == 15


def test_bad_names_are_rejected():
    v = UALMVocab.from_config(make_config("debug"))
    with pytest.raises(ValueError):
        v.role("robot")
    with pytest.raises(ValueError):
        v.special("<|nope|>")
