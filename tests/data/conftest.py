"""Tiny real components for the data tests: a trained tokenizer, a random X-Codec, audio files.

Everything is built here, offline (session-scoped). Each artefact lives in a fixed directory
of the session's temporary root and is built once: tests/tools registers these fixtures a
second time, and both registrations then share the same files.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from megatron_ualm.config import make_config
from megatron_ualm.vocab import UALMVocab

WORDS = ("dog bark rain wind engine car bird song piano guitar speech crowd water drip door slam "
         "siren bell clock tick laugh baby cry thunder storm train horn wave beach fire crackle").split()


def once(tmp_path_factory, name: str, build) -> str:
    """``build(directory)`` the first time ``name`` is asked for in this session."""
    d = tmp_path_factory.getbasetemp() / name
    if not (d / ".done").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        build(d)
        (d / ".done").touch()
    return str(d)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(n)]


@pytest.fixture(scope="session")
def debug_config():
    return make_config("debug")


@pytest.fixture(scope="session")
def vocab(debug_config) -> UALMVocab:
    return UALMVocab.from_config(debug_config)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, debug_config) -> str:
    """A word-piece-free BPE trained on the test words; vocab fits the debug flavor's text ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator(sentences(500), trainer)
    assert tok.get_vocab_size() <= debug_config.text_vocab_size
    return os.path.join(once(tmp_path_factory, "tok", lambda d: tok.save(str(d / "tokenizer.json"))), "tokenizer.json")


@pytest.fixture(scope="session")
def sentencepiece_path(tmp_path_factory) -> str:
    import sentencepiece as spm

    def build(d):
        (d / "corpus.txt").write_text("\n".join(sentences(300)))
        spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"), vocab_size=60,
                                       model_type="bpe", minloglevel=2)

    return os.path.join(once(tmp_path_factory, "sp", build), "sp.model")


@pytest.fixture(scope="session")
def codec_dir(tmp_path_factory, debug_config) -> str:
    """A tiny random X-Codec (K=8, card=64) with random codebooks, saved like a checkpoint."""
    from megatron_ualm.tiny.corpus import build_random_xcodec

    def build(d):
        build_random_xcodec(str(d), debug_config.num_codebooks, debug_config.codebook_size)

    return once(tmp_path_factory, "xcodec", build)


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.shape)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> str:
    """Synthesised clips: 16 kHz mono WAV, 44.1 kHz stereo FLAC, 22.05 kHz OGG, a corrupt file."""
    def build(d):
        for i in range(6):
            sf.write(d / f"wav{i}.wav", tone(0.5 + 0.4 * i, 16000, 200 + 50 * i, seed=i), 16000)
        sf.write(d / "stereo.flac", tone(2.5, 44100, 330, channels=2), 44100)
        sf.write(d / "clip.ogg", tone(1.2, 22050, 550), 22050, format="OGG", subtype="VORBIS")
        (d / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage that is not audio" * 10)
        write_jsonl(d / "gen.jsonl", generation_records(48))
        write_jsonl(d / "und.jsonl", understanding_records(48))

    return once(tmp_path_factory, "audio", build)


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def text_records(n: int, seed: int = 0) -> list[dict]:
    s = sentences(3 * n, seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append({"text": s[3 * i]})
        else:
            out.append({"messages": [{"role": "system", "content": s[3 * i]},
                                     {"role": "user", "content": s[3 * i + 1]},
                                     {"role": "assistant", "content": s[3 * i + 2]}]})
    return out


def generation_records(n: int, seed: int = 0) -> list[dict]:
    s = sentences(n, seed + 1)
    names = [f"wav{i}.wav" for i in range(6)] + ["stereo.flac", "clip.ogg"]
    out = []
    for i in range(n):
        r = {"audio": names[i % len(names)], "caption": s[i]}
        if i % 3 == 0:
            r["rich_caption"] = {"keywords": ["dog", "rain"], "layout": "dog then rain", "description": s[i]}
        if i % 4 == 1:
            r.update(start=0.1, end=0.5)
        out.append(r)
    return out


def understanding_records(n: int, seed: int = 0) -> list[dict]:
    s = sentences(2 * n, seed + 2)
    names = [f"wav{i}.wav" for i in range(6)] + ["stereo.flac", "clip.ogg"]
    return [{"sound": names[i % len(names)],
             "conversations": [{"from": "human", "value": f"<sound>\n{s[2 * i]}"},
                               {"from": "gpt", "value": s[2 * i + 1]}]} for i in range(n)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tokenizer_path, codec_dir, audio_dir):
    """Shards of all three families written by the tools from tiny manifests (session-wide)."""
    from megatron_ualm.data.cli import (preprocess_generation_main, preprocess_text_main,
                                        preprocess_understanding_main)

    def build(out):
        text = write_jsonl(out / "text.jsonl", text_records(400))
        gen, und = os.path.join(audio_dir, "gen.jsonl"), os.path.join(audio_dir, "und.jsonl")
        common = ["--tokenizer", tokenizer_path, "--no-progress"]
        audio_in = ["--n-mels", "16", "--window-seconds", "2", "--records-per-shard", "16", *common]
        assert preprocess_text_main(["--input", text, "--output", str(out / "text"), "--records-per-shard", "150",
                                     *common]) == 0
        assert preprocess_generation_main(["--input", gen, "--output", str(out / "gen"), "--records-per-shard", "16",
                                           "--codec-path", codec_dir, *common]) == 0
        assert preprocess_understanding_main(["--input", und, "--output", str(out / "und"), *audio_in]) == 0
        assert preprocess_understanding_main(["--input", und, "--output", str(out / "und_mel"), "--audio-in-storage",
                                              "mel", "--flavor", "debug", "--records-per-shard", "16", *common]) == 0

    root = once(tmp_path_factory, "shards", build)
    return {"root": root, "text": os.path.join(root, "text"), "generation": os.path.join(root, "gen"),
            "understanding": os.path.join(root, "und"), "understanding_mel": os.path.join(root, "und_mel")}
