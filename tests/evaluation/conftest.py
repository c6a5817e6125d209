"""Tiny random backbones (the real model classes) written once per session, synthetic clips."""

from __future__ import annotations

import os

import pytest

from tests.inference.conftest import one_thread  # noqa: F401  (autouse: tiny ops run faster on one thread)

# Nothing here may reach a model hub: a download attempt fails instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict:
    """``{backbone: path}`` of random tiny checkpoints (PANNs is full size: its widths are fixed)."""
    from megatron_ualm.tiny import backbones as tiny_models

    return tiny_models.write_all(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def loaded_backbones(tiny_backbones) -> dict:
    from megatron_ualm.evaluation.tta import load_backbones

    return load_backbones(tiny_backbones, device="cpu")


@pytest.fixture(scope="session")
def decoding_inputs(tmp_path_factory) -> dict:
    """What decoding with the random debug model needs: a BPE tokenizer, a random X-Codec and two prompts."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megatron_ualm.config import make_config
    from megatron_ualm.tiny.corpus import build_random_xcodec

    root = tmp_path_factory.mktemp("decoding")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["rain on a tin roof", "a dog barks twice", "wind in the trees"] * 20,
                            trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"], show_progress=False))
    tok.save(str(root / "tokenizer.json"))
    cfg = make_config("debug")
    codec = build_random_xcodec(str(root / "xcodec"), cfg.num_codebooks, cfg.codebook_size)
    (root / "prompts.jsonl").write_text(json.dumps({"id": "rain", "prompt": "rain on a tin roof"}) + "\n"
                                        + json.dumps({"id": "dog", "prompt": "a dog barks twice"}) + "\n")
    return {"tokenizer": str(root / "tokenizer.json"), "codec": codec, "prompts": str(root / "prompts.jsonl")}
