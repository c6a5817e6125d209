"""A tiny local corpus, made with the real tools: the CPU quick start's data and the recipes'.

Everything is generated locally (no downloads): a BPE tokenizer trained on the corpus text, a
tiny random X-Codec (``transformers`` ``XcodecModel``, K=8 codebooks of 64 codes, random
codebooks) saved as a checkpoint directory, and synthesised 16 kHz clips whose pitch and
length their captions name ("a short high beep"), so text, generation and understanding all
carry learnable structure. ``build`` then runs the three preprocessing tools into token shards
and ``build_blend`` into the mixture ``python -m megatron_ualm.pretrain --blend-file`` reads.
"""

from __future__ import annotations

import json
import os

import numpy as np

from megatron_ualm.progress import library_bars_off

PITCHES = {"low hum": 150.0, "middle tone": 300.0, "high beep": 600.0, "whistle": 1200.0}
LENGTHS = {"short": 0.6, "long": 1.2}
WORDS = ("the dog cat bird barks sings runs sleeps in on under a house tree garden rain sun "
         "morning night loud quiet small big red green").split()
SAMPLE_RATE = 16000


def sentence(rng: np.random.Generator) -> str:
    """A short templated sentence (subject verb preposition object), so text loss can fall."""
    subject = rng.choice(["the dog", "the cat", "a bird", "the small dog", "a big cat"])
    verb = rng.choice(["barks", "sings", "runs", "sleeps"])
    where = rng.choice(["in the garden", "under the tree", "in the house", "in the rain", "at night"])
    return f"{subject} {verb} {where}"


def tone(freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A sine at ``freq`` with a short fade and a little noise, float32 mono at 16 kHz."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    fade = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.02)
    x = 0.4 * np.sin(2 * np.pi * freq * t) * fade + 0.01 * rng.standard_normal(t.shape)
    return x.astype(np.float32)


def train_tokenizer(texts: list[str], path: str, vocab_size: int) -> str:
    """A BPE tokenizer (``tokenizers``) over ``texts``, saved as ``tokenizer.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"],
                                                       show_progress=False))
    tok.save(path)
    return path


def build_random_xcodec(directory: str, num_codebooks: int, codebook_size: int, seed: int = 0) -> str:
    """A tiny random ``XcodecModel`` with random (not zero) codebooks, via ``save_pretrained``.

    A freshly initialised X-Codec has zero codebooks and encodes everything to code 0; random
    codebooks make the codes depend on the audio.
    """
    import torch
    from transformers import HubertConfig, XcodecConfig, XcodecModel

    torch.manual_seed(seed)
    cfg = XcodecConfig(
        target_bandwidths=[num_codebooks * 50 * int(np.log2(codebook_size)) / 1000],
        codebook_size=codebook_size,
        acoustic_model_config=dict(encoder_hidden_size=4, decoder_hidden_size=32, hidden_size=8),
        semantic_model_config=HubertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        ).to_dict(),
    )
    model = XcodecModel(cfg).eval()
    with torch.no_grad():
        for q in model.quantizer.quantizers:
            q.codebook.embed.normal_()
    with library_bars_off():
        model.save_pretrained(directory)
    return directory


def write_corpus(workdir: str, num_text: int, num_clips: int, seed: int) -> dict:
    """Writes tokenizer, codec, clips and the three JSONL manifests; returns their paths."""
    import soundfile as sf

    from megatron_ualm.config import make_config

    config = make_config("debug")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(workdir, "clips"), exist_ok=True)
    texts = [sentence(rng) for _ in range(num_text * 2)]
    captions = []
    for i in range(num_clips):
        pitch, length = list(PITCHES)[i % len(PITCHES)], list(LENGTHS)[(i // len(PITCHES)) % len(LENGTHS)]
        name = f"clips/clip{i:04d}.wav"
        sf.write(os.path.join(workdir, name), tone(PITCHES[pitch], LENGTHS[length], rng), SAMPLE_RATE)
        captions.append((name, f"a {length} {pitch}"))

    vocab_words = texts + [c for _, c in captions] + ["what do you hear", "describe the sound"]
    tokenizer = train_tokenizer(vocab_words, os.path.join(workdir, "tokenizer.json"),
                                vocab_size=min(200, config.text_vocab_size))
    codec = build_random_xcodec(os.path.join(workdir, "xcodec"), config.num_codebooks, config.codebook_size, seed)

    def jsonl(name: str, records) -> str:
        path = os.path.join(workdir, name)
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        return path

    text = jsonl("text.jsonl", (
        {"text": f"{texts[2 * i]} . {texts[2 * i + 1]}"} if i % 2 else
        {"messages": [{"role": "user", "content": texts[2 * i]}, {"role": "assistant", "content": texts[2 * i + 1]}]}
        for i in range(num_text)))
    generation = jsonl("generation.jsonl", ({"audio": n, "caption": c} for n, c in captions))
    # The captions as prompts, with the clip ids (file stems): generate / evaluate read them, and
    # the clips themselves are the reference set (KL pairs a generated clip with its reference by id).
    prompts = jsonl("prompts.jsonl", ({"id": os.path.splitext(os.path.basename(n))[0], "prompt": c}
                                      for n, c in captions))
    understanding = jsonl("understanding.jsonl", (
        {"sound": n, "conversations": [{"from": "human", "value": "<sound>\nwhat do you hear"},
                                       {"from": "gpt", "value": c}]} for n, c in captions))
    return dict(tokenizer=tokenizer, codec=codec, text=text, generation=generation, understanding=understanding,
                prompts=prompts, clips=os.path.join(workdir, "clips"))


def build(workdir: str, num_text: int = 600, num_clips: int = 160, workers: int = 2, seed: int = 0) -> dict:
    """Writes the corpus, its shards and ``<workdir>/blend.json``; returns the corpus paths.

    Raises:
        RuntimeError: a preprocessing tool failed (its message is on stderr).
    """
    from megatron_ualm.data.cli import (build_blend_main, preprocess_generation_main, preprocess_text_main,
                                        preprocess_understanding_main)

    w = workdir
    paths = write_corpus(w, num_text, num_clips, seed)
    common = ["--tokenizer", paths["tokenizer"], "--workers", str(workers), "--no-progress"]
    steps = [
        (preprocess_text_main, ["--input", paths["text"], "--output", f"{w}/shards/text", *common]),
        (preprocess_generation_main, ["--input", paths["generation"], "--output", f"{w}/shards/generation",
                                      "--codec", "xcodec", "--codec-path", paths["codec"], *common]),
        (preprocess_understanding_main, ["--input", paths["understanding"], "--output", f"{w}/shards/understanding",
                                         "--n-mels", "16", "--window-seconds", "2", *common]),
        (build_blend_main, [f"{w}/shards/text", f"{w}/shards/generation", f"{w}/shards/understanding",
                            "--output", f"{w}/blend.json"]),
    ]
    for tool, tool_args in steps:
        if tool(tool_args) != 0:
            raise RuntimeError(f"{tool.__name__} failed; see the messages above")
    return dict(paths, blend=os.path.join(w, "blend.json"))
