"""Tiny real components for the generation tests: the random debug model, a trained BPE
tokenizer, a random X-Codec with random codebooks (all built offline in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

WORDS = ("dog bark rain wind engine car bird song piano guitar speech crowd water drip door slam "
         "siren bell clock tick laugh baby cry thunder storm train horn wave beach fire crackle "
         "keywords layout description what kind of sound").split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run ~100x slower with 2 intra-op threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model(parallel_world_of_one):
    from megatron_ualm import api

    torch.manual_seed(0)
    return api.build_model("debug").eval()


@pytest.fixture(scope="session")
def generator(model):
    from megatron_ualm.inference import Generator

    return Generator(model)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, model) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False))
    assert tok.get_vocab_size() <= model.config.text_vocab_size
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def codec_dir(tmp_path_factory, model) -> str:
    """A tiny random X-Codec (K=8, card=64, 16 kHz, 50 Hz) with random codebooks."""
    from megatron_ualm.tiny.corpus import build_random_xcodec

    path = tmp_path_factory.mktemp("codec") / "xcodec"
    return build_random_xcodec(str(path), model.config.num_codebooks, model.config.codebook_size)


@pytest.fixture(scope="session")
def ualm(model, tokenizer_path, codec_dir):
    from megatron_ualm.data.tokenizer import TextTokenizer
    from megatron_ualm.inference import UALM, CodecDecoder

    return UALM(model, TextTokenizer(tokenizer_path), CodecDecoder.load(codec_dir, device="cpu"))
