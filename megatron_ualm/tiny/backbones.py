"""Tiny random checkpoints of the evaluation backbones, for tests and CPU recipes.

Each writer builds the backbone's real model class (shrunk where its constructor allows: CLAP,
PaSST, the aesthetics WavLM) with random weights and saves it in the layout the loader reads, so
code under test runs the real scorer / metric path end to end. Scores from random weights mean
nothing; they are finite, deterministic for a seed, and differ between clips.

```python
from megatron_ualm.tiny import backbones
clap_dir = backbones.write_tiny_clap(tmp / "clap")
aes_dir = backbones.write_tiny_aesthetics(tmp / "aes")
load_scorer("clap", clap_dir).score(waves, 16000, texts)
```
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from megatron_ualm.evaluation import backbones
from megatron_ualm.progress import library_bars_off


def _fresh_dir(path) -> str:
    path = str(path)
    os.makedirs(path, exist_ok=True)
    return path


def _write_config(path: str, config: dict) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def _tiny_roberta_tokenizer():
    """A byte-level BPE trained in milliseconds on a few captions, as CLAP's RoBERTa tokenizer."""
    import json as _json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = ["a dog barks in the rain", "rain on a tin roof", "a car passes by", "birds sing at dawn",
              "a piano plays a slow melody", "people talk in a busy cafe"] * 20
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    model = _json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizer(vocab=model["vocab"], merges=merges)


@backbones.research_code_warnings_off()  # the packages warn while building their models
def write_tiny_clap(path, seed: int = 0) -> str:
    """A random ``transformers`` CLAP (HTSAT + RoBERTa towers, fusion on) with its processor.

    Returns:
        The folder (``ClapModel`` / ``ClapProcessor`` ``save_pretrained`` layout).
    """
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, ClapTextConfig

    path = _fresh_dir(path)
    torch.manual_seed(seed)
    tok = _tiny_roberta_tokenizer()
    if len(tok("a dog barks")["input_ids"]) < 4:
        raise RuntimeError("the tiny CLAP tokenizer does not split text (transformers' RobertaTokenizer API changed?)")
    text = ClapTextConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=80, projection_dim=32,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    audio = ClapAudioConfig(depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1], patch_embeds_hidden_size=8,
                            hidden_size=64, projection_dim=32, enable_fusion=True, window_size=8)
    model = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=32)).eval()
    with library_bars_off():
        model.save_pretrained(path)
    ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation="fusion"), tokenizer=tok).save_pretrained(path)
    return path


@backbones.research_code_warnings_off()  # the packages warn while building their models
def write_tiny_aesthetics(path, seed: int = 0) -> str:
    """A random AudioBox-Aesthetics ``checkpoint.pt`` with a 2-layer, 32-wide WavLM.

    Returns:
        The folder holding ``checkpoint.pt``.
    """
    from audiobox_aesthetics.model import aes

    path = _fresh_dir(path)
    torch.manual_seed(seed)
    wavlm_cfg = {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 2,
                 "conv_feature_layers": "[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2", "conv_pos": 16,
                 "conv_pos_groups": 4, "num_buckets": 32, "max_distance": 64}
    model_cfg = {"proj_num_layer": 1, "proj_ln": False, "proj_act_fn": "gelu", "proj_dropout": 0.0, "nth_layer": 3,
                 "use_weighted_layer_sum": True, "precision": "32", "normalize_embed": True, "output_dim": 1,
                 "wavlm_cfg": wavlm_cfg}
    transform = {a: {"mean": 5.0 + 0.1 * i, "std": 1.5} for i, a in enumerate(backbones.AES_AXES)}
    default_cfg = aes.DEFAULT_AUDIO_CFG
    aes.DEFAULT_AUDIO_CFG = aes.WavLMConfig({**vars(default_cfg), **wavlm_cfg})
    try:
        model = aes.AesMultiOutput(**{k: v for k, v in model_cfg.items() if k != "wavlm_cfg"}, target_transform=transform)
    finally:
        aes.DEFAULT_AUDIO_CFG = default_cfg
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_cfg": model_cfg, "target_transform": transform},
               os.path.join(path, "checkpoint.pt"))
    return path


@backbones.research_code_warnings_off()  # the packages warn while building their models
def write_tiny_openl3(path, seed: int = 0) -> str:
    """A random OpenL3 (``PytorchOpenl3``, mel256, 512-d; the architecture has no size knobs)."""
    from torchopenl3.models import PytorchOpenl3

    path = _fresh_dir(path)
    torch.manual_seed(seed)
    model = PytorchOpenl3(**backbones.OpenL3.DEFAULTS)
    _randomize_norms(model, seed)
    torch.save(model.state_dict(), os.path.join(path, "model.pt"))
    _write_config(path, backbones.OpenL3.DEFAULTS)
    return path


@backbones.research_code_warnings_off()  # the packages warn while building their models
def write_tiny_passt(path, seed: int = 0, embed_dim: int = 32, depth: int = 1, num_heads: int = 2) -> str:
    """A random PaSST network (the real class, 10 s input geometry, narrow and shallow)."""
    from hear21passt.models.passt import PaSST

    path = _fresh_dir(path)
    torch.manual_seed(seed)
    config = {**backbones.PaSST.DEFAULTS, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    with backbones._quiet():
        net = PaSST(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    torch.save(net.state_dict(), os.path.join(path, "model.pt"))
    _write_config(path, config)
    return path


@backbones.research_code_warnings_off()  # the packages warn while building their models
def write_tiny_panns(path, seed: int = 0, classes_num: int = 527) -> str:
    """A random PANNs ``Cnn14`` with the 16 kHz settings (its channel widths are fixed: ~80M
    parameters, about 320 MB on disk)."""
    path = _fresh_dir(path)
    torch.manual_seed(seed)
    config = {**backbones.PANNs.DEFAULTS, "classes_num": classes_num}
    model = backbones._panns_models().Cnn14(**config)
    _randomize_norms(model, seed)
    torch.save({"model": model.state_dict()}, os.path.join(path, "model.pt"))
    _write_config(path, config)
    return path


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Gives batch norms non-trivial running statistics (fresh ones are identities at eval)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def write_all(root, seed: int = 0) -> dict:
    """Every tiny backbone under ``root``; returns ``{backbone name: path}``."""
    root = str(root)
    return {
        "clap": write_tiny_clap(os.path.join(root, "clap"), seed),
        "openl3": write_tiny_openl3(os.path.join(root, "openl3"), seed),
        "passt": write_tiny_passt(os.path.join(root, "passt"), seed),
        "panns": write_tiny_panns(os.path.join(root, "panns"), seed),
        "aesthetics": write_tiny_aesthetics(os.path.join(root, "aesthetics"), seed),
    }


def write_clips(folder, names, seconds: float = 1.0, sample_rate: int = 16000, seed: int = 0,
                rates: Optional[list] = None) -> list[str]:
    """Writes distinct synthetic WAV clips (tones + noise) named ``<name>.wav``; returns paths."""
    import soundfile as sf

    folder = _fresh_dir(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for i, name in enumerate(names):
        sr = rates[i % len(rates)] if rates else sample_rate
        t = np.arange(int(seconds * sr)) / sr
        f0 = float(rng.uniform(150, 2000))
        wave = 0.4 * np.sin(2 * np.pi * f0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t))
        wave = wave + 0.05 * rng.standard_normal(t.shape)
        p = os.path.join(folder, f"{name}.wav")
        sf.write(p, wave.astype(np.float32), sr, subtype="PCM_16")
        paths.append(p)
    return paths
