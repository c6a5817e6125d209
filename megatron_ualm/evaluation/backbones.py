"""The paper's evaluation backbones, each loaded from a local path with its package's own model
class, each resampling its own input.

| backbone | package (class) | reads | gives | used for |
| --- | --- | --- | --- | --- |
| LAION-CLAP | ``transformers`` (``ClapModel``, the HF port of LAION-CLAP's HTSAT + RoBERTa) | 48 kHz | audio / text embeddings | CL, FD-CLAP, the "clap" scorer |
| OpenL3 | ``torchopenl3`` (``PytorchOpenl3``, mel256) | 44.1 kHz (-> 48 kHz inside) | 512-d frame embeddings | FD |
| PaSST | ``hear21passt`` (``PaSST`` + ``AugmentMelSTFT``) | 32 kHz | 527 AudioSet logits | KL |
| PANNs | ``panns-inference`` (``Cnn14``, 16 kHz settings of Cnn14_16k) | 16 kHz | 527 logits, 2048-d embedding | IS, FD-PANNs |
| AudioBox-Aesthetics | ``audiobox-aesthetics`` (``AesMultiOutput``, WavLM) | 16 kHz | CE / CU / PC / PQ | AES, the "aesthetics" scorer |

Pre-processing follows the code each metric is reported with: stable-audio-metrics for OpenL3
FD, PaSST KL and the CLAP score (mono, peak-normalised to -1 dBFS, OpenL3 at 44.1 kHz with a
0.5 s hop, PaSST on 10 s windows with 5 s overlap, logits averaged over windows), audioldm_eval
for PANNs (mono, DC removed, at least 2 s), the package's own predictor for the aesthetics
(10 s windows, length-weighted). Resampling is soxr's HQ filter everywhere.

A ``path`` is what the user downloaded beforehand: the official checkpoint file, or a directory
with the weights and an optional ``config.json`` of the model class's arguments (the tiny random
tiny backbones of ``tiny.backbones`` use that to shrink the architecture). CLAP is a
``transformers`` directory (``save_pretrained`` of ``ClapModel`` + ``ClapProcessor``). Nothing is
downloaded: every package entry point that would download (``torchopenl3``'s model loader,
``panns_inference``'s ``AudioTagging`` and label CSV, ``hear21passt``'s ``get_basic_model``, the
aesthetics ``from_pretrained``) is bypassed by building the model class and loading the state dict.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import types
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_ualm.progress import library_bars_off

# ----------------------------------------------------------------------------------- helpers


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``device`` or, when None, the current GPU if there is one, else the CPU."""
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def prepare(wave: np.ndarray, sample_rate: int, target_rate: int, peak_db: Optional[float] = None,
            remove_dc: bool = False, min_samples: int = 0) -> np.ndarray:
    """One clip as a backbone reads it.

    Args:
        wave: ``[n]`` mono or ``[n, c]`` multichannel samples (soundfile's layout; averaged).
        sample_rate: their rate.
        target_rate: the backbone's rate (soxr HQ resampling).
        peak_db: peak-normalise to this many dBFS (stable-audio-metrics uses -1); silence stays silent.
        remove_dc: subtract the mean (audioldm_eval's PANNs input).
        min_samples: zero-pad at the end up to this length.

    Returns:
        float32 ``[m]``.
    """
    x = np.asarray(wave, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1:
        raise ValueError(f"expected a mono [n] or multichannel [n, c] waveform, got shape {x.shape}")
    if sample_rate != target_rate and x.size:
        import soxr

        x = soxr.resample(x, sample_rate, target_rate, quality="HQ").astype(np.float32)
    if remove_dc and x.size:
        x = x - x.mean()
    if peak_db is not None:
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > 0:
            x = x * (10.0 ** (peak_db / 20.0) / peak)
    if x.size < min_samples:
        x = np.pad(x, (0, min_samples - x.size))
    return np.ascontiguousarray(x, dtype=np.float32)


def windows(wave: np.ndarray, window: int, hop: int, min_fraction: float = 0.0) -> list[np.ndarray]:
    """Splits a clip into ``window``-sample windows every ``hop`` samples, zero-padding the last.

    As stable-audio-metrics' PaSST loop: windows start at ``0, hop, ...`` while the start is below
    ``max(hop, n - hop)``; a padded window whose audio covers ``min_fraction`` of it or less is
    dropped (unless it is the only one).
    """
    n = wave.shape[0]
    out = []
    for start in range(0, max(hop, n - hop), hop):
        w = wave[start:start + window]
        if w.shape[0] < window:
            if w.shape[0] <= window * min_fraction and out:
                continue
            w = np.pad(w, (0, window - w.shape[0]))
        out.append(w)
    return out


def read_checkpoint(path: str, backbone: str, defaults: dict, weight_names: Sequence[str]) -> tuple[dict, str]:
    """Finds a backbone's weights and architecture arguments.

    Args:
        path: the official checkpoint file, or a directory holding one of ``weight_names`` and
            optionally ``config.json`` (arguments that override ``defaults``).
        backbone: its name, for errors.
        defaults: the architecture of the official checkpoint.
        weight_names: file names looked for in a directory, in order.

    Returns:
        ``(config, weights_file)``.
    """
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{backbone} weights {path!r} do not exist: give the local checkpoint file or folder "
                                f"({README_HINT})")
    config = dict(defaults)
    if os.path.isfile(path):
        return config, path
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            try:
                config.update(json.load(f))
            except json.JSONDecodeError as err:
                raise ValueError(f"{cfg_file}: not valid JSON ({err})") from None
    for name in weight_names:
        if os.path.isfile(os.path.join(path, name)):
            return config, os.path.join(path, name)
    raise FileNotFoundError(f"{backbone} folder {path} holds none of {list(weight_names)} ({README_HINT})")


README_HINT = "see README 'Evaluation: preparing the backbones'"


def check_backbone_paths(paths: dict[str, Optional[str]]) -> None:
    """``Backbone.check_path`` of every given ``{name: path}``, before any model or clip is touched."""
    for name, path in paths.items():
        if path:
            BACKBONES[name].check_path(path)


def load_state_dict(weights: str) -> dict:
    """A state dict from a ``torch.save`` file (tensors only; ``{"model": sd}`` and
    ``{"state_dict": sd}`` wrappers unwrapped) or a ``.safetensors`` file."""
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with Python objects, or not a torch file at all
        raise ValueError(f"{weights}: cannot be read as a torch state dict ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def path_identity(path: str) -> str:
    """A digest of a checkpoint's files (name, size, mtime): a new or changed checkpoint gets a new
    identity, so cached embeddings of the old one are not reused."""
    h = hashlib.sha1()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, path) if f != path else os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet():
    """Silences the research packages' prints (model reprs, banners) on stdout."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


# What the backbones' own packages (and torch under them) warn about on every load or forward:
# their use of deprecated torch APIs, an input one frame off the size PaSST was trained on, empty
# mel filters of OpenL3's fixed filterbank. None of it is the user's to act on.
_RESEARCH_CODE_WARNINGS = (
    r"`torch\.nn\.utils\.weight_norm` is deprecated", r"stft with return_complex=False is deprecated",
    r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", r"Input image size \(\d+\*\d+\) doesn't match model",
    r"Empty filters detected in mel frequency basis", r"Support for mismatched key_padding_mask and attn_mask",
)


@contextlib.contextmanager
def research_code_warnings_off():
    """Runs a block with the backbones' packages' known deprecation and shape warnings dropped."""
    with warnings.catch_warnings():
        for pattern in _RESEARCH_CODE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@contextlib.contextmanager
def numpy_seeded(seed: int):
    """Runs a block with numpy's global RNG seeded, then restores the caller's RNG state
    (``ClapFeatureExtractor`` draws crops from the global RNG)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class Backbone:
    """A frozen audio model that turns clips into per-clip arrays.

    Subclasses set ``name``, ``sample_rate`` and ``outputs`` and implement ``_features``.

    Args:
        path: local checkpoint file or folder.
        device: torch device (default: the current GPU, else CPU).
        batch_size: network inputs (frames / windows / clips) per forward.
    """

    name: str = ""
    label: str = ""
    """The backbone's name in messages."""
    weight_names: tuple = ("model.pt", "model.pth", "model.safetensors")
    """The weight files a checkpoint folder may hold, in the order they are looked for."""
    sample_rate: int = 16000
    outputs: tuple = ()

    @classmethod
    def check_path(cls, path: str) -> None:
        """Checks, without loading anything, that ``path`` is a checkpoint this backbone reads.

        Raises:
            FileNotFoundError / ValueError: the message says what the path must hold.
        """
        read_checkpoint(path, cls.label, {}, cls.weight_names)

    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 32) -> None:
        self.path = path
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self._options = ""

    @property
    def identity(self) -> str:
        """Names the backbone, its weights and its options (the feature cache key)."""
        return f"{self.name}-{path_identity(self.path)}{self._options}"

    @torch.inference_mode()
    def features(self, waves: Sequence[np.ndarray], sample_rate: int) -> list[dict]:
        """Per-clip outputs.

        Args:
            waves: mono clips.
            sample_rate: their rate (each backbone resamples to its own).

        Returns:
            One dict per clip, keyed by ``outputs`` (float32 arrays).
        """
        if not len(waves):
            return []
        with research_code_warnings_off():
            return self._features(list(waves), sample_rate)

    def _features(self, waves: list, sample_rate: int) -> list[dict]:
        raise NotImplementedError

    def _run(self, inputs: torch.Tensor, fn) -> list[torch.Tensor]:
        """Applies ``fn`` to ``inputs`` ``[N, ...]`` in batches on the device; CPU float results."""
        out = []
        for s in _batches(inputs.shape[0], self.batch_size):
            r = fn(inputs[s].to(self.device, non_blocking=True))
            out.append(r.float().cpu() if isinstance(r, torch.Tensor) else tuple(t.float().cpu() for t in r))
        return out


# ----------------------------------------------------------------------------------- OpenL3


class OpenL3(Backbone):
    """OpenL3 frame embeddings (``torchopenl3.models.PytorchOpenl3``).

    Args:
        hop_seconds: analysis hop (the window is 1 s); stable-audio-metrics uses 0.5.
        eval_rate: the rate the clip is brought to first (the metric's bandwidth, 44.1 kHz in
            the paper); OpenL3's own front end then resamples to 48 kHz (``julius``).
    """

    name, label, sample_rate, outputs = "openl3", "OpenL3", 44100, ("openl3",)
    weight_names = ("model.pt", "model.pth", "model.pth.tar", "model.safetensors")
    DEFAULTS = {"input_repr": "mel256", "content_type": "env", "embedding_size": 512}

    @research_code_warnings_off()  # the packages warn while building their models
    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 64,
                 hop_seconds: float = 0.5, eval_rate: int = 44100) -> None:
        super().__init__(path, device, batch_size)
        from torchopenl3.models import PytorchOpenl3

        config, weights = read_checkpoint(path, self.label, self.DEFAULTS, self.weight_names)
        self.model = PytorchOpenl3(**config)
        self.model.load_state_dict(load_state_dict(weights))
        self.model.eval().to(self.device)
        self.hop_seconds, self.sample_rate = hop_seconds, eval_rate
        self._options = f"-hop{hop_seconds}-sr{eval_rate}-{config['input_repr']}-{config['embedding_size']}"

    def _features(self, waves, sample_rate):
        from torchopenl3.utils import preprocess_audio_batch

        frames, counts = [], []
        for w in waves:
            x = torch.from_numpy(prepare(w, sample_rate, self.sample_rate, peak_db=-1.0)).to(self.device)
            f = preprocess_audio_batch(x[None], self.sample_rate, center=True, hop_size=self.hop_seconds,
                                       sampler="julian")  # [F, 1, 48000]
            frames.append(f.float())
            counts.append(f.shape[0])
        emb = torch.cat(self._run(torch.cat(frames), self.model))  # [sum F, d]
        return [{"openl3": e.numpy()} for e in torch.split(emb, counts)]


# ----------------------------------------------------------------------------------- PaSST


class PaSST(Backbone):
    """PaSST AudioSet logits, averaged over 10 s windows with 5 s overlap (``hear21passt``).

    The default architecture is ``passt_s_swa_p16_128_ap476`` (stable-audio-metrics' model,
    ``hear21passt.base.get_basic_model``), whose release file is the state dict of the network.
    """

    name, label, sample_rate, outputs = "passt", "PaSST", 32000, ("passt_logits",)
    DEFAULTS = {"img_size": [128, 998], "patch_size": 16, "stride": [10, 10], "in_chans": 1, "num_classes": 527,
                "embed_dim": 768, "depth": 12, "num_heads": 12, "distilled": True}
    WINDOW_SECONDS, OVERLAP_SECONDS = 10.0, 5.0

    @research_code_warnings_off()  # the packages warn while building their models
    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 16) -> None:
        super().__init__(path, device, batch_size)
        from hear21passt.models.passt import PaSST as PaSSTNet
        from hear21passt.models.preprocess import AugmentMelSTFT
        from hear21passt.wrapper import PasstBasicWrapper

        config, weights = read_checkpoint(path, self.label, self.DEFAULTS, self.weight_names)
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        with _quiet():
            # The mel front end of get_basic_model (the one PaSST was trained with).
            mel = AugmentMelSTFT(n_mels=128, sr=32000, win_length=800, hopsize=320, n_fft=1024, freqm=48, timem=192,
                                 htk=False, fmin=0.0, fmax=None, norm=1, fmin_aug_range=10, fmax_aug_range=2000)
            net = PaSSTNet(**config)
        net.load_state_dict(load_state_dict(weights))
        self.model = PasstBasicWrapper(mel=mel, net=net, mode="logits").eval().to(self.device)

    def _features(self, waves, sample_rate):
        window = int(self.WINDOW_SECONDS * self.sample_rate)
        hop = int((self.WINDOW_SECONDS - self.OVERLAP_SECONDS) * self.sample_rate)
        wins, counts = [], []
        for w in waves:
            ws = windows(prepare(w, sample_rate, self.sample_rate, peak_db=-1.0), window, hop, min_fraction=0.15)
            wins.extend(ws)
            counts.append(len(ws))
        with _quiet():  # PaSST prints shapes on its first forward
            logits = torch.cat(self._run(torch.from_numpy(np.stack(wins)), self.model))  # [W, 527]
        return [{"passt_logits": chunk.mean(0).numpy()} for chunk in torch.split(logits, counts)]


# ----------------------------------------------------------------------------------- PANNs


def _panns_models():
    """``panns_inference.models`` without running ``panns_inference/__init__.py``.

    That ``__init__`` imports ``config.py``, which downloads AudioSet's label CSV with ``wget``
    at import time (and fails offline); the model classes need none of it, so the package is
    entered through a bare module object that only carries its search path.
    """
    if "panns_inference.models" in sys.modules:
        return sys.modules["panns_inference.models"]
    spec = importlib.util.find_spec("panns_inference")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("panns-inference is not installed: pip install 'megatron-ualm[eval]'")
    had_parent = "panns_inference" in sys.modules
    if not had_parent:
        parent = types.ModuleType("panns_inference")
        parent.__path__ = list(spec.submodule_search_locations)
        sys.modules["panns_inference"] = parent
    try:
        return importlib.import_module("panns_inference.models")
    finally:
        if not had_parent:
            # A later plain ``import panns_inference`` runs the real package again.
            del sys.modules["panns_inference"]


class PANNs(Backbone):
    """PANNs Cnn14 at 16 kHz: pre-sigmoid AudioSet logits (IS) and the 2048-d embedding (FD).

    The default architecture is ``Cnn14`` with the settings of ``Cnn14_16k_mAP=0.438.pth`` (the
    checkpoint audioldm_eval evaluates with at 16 kHz).
    """

    name, label, sample_rate, outputs = "panns", "PANNs", 16000, ("panns_logits", "panns_embedding")
    DEFAULTS = {"sample_rate": 16000, "window_size": 512, "hop_size": 160, "mel_bins": 64, "fmin": 50,
                "fmax": 8000, "classes_num": 527}

    @research_code_warnings_off()  # the packages warn while building their models
    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 32) -> None:
        super().__init__(path, device, batch_size)
        config, weights = read_checkpoint(path, self.label, self.DEFAULTS, self.weight_names)
        self.sample_rate = int(config["sample_rate"])
        self.model = _panns_models().Cnn14(**config)
        self.model.load_state_dict(load_state_dict(weights))
        self.model.eval().to(self.device)
        self._logits: list = []
        # The package's forward returns sigmoid(logits); IS is defined on the logits themselves.
        self.model.fc_audioset.register_forward_hook(lambda _m, _i, out: self._logits.append(out))

    def _forward(self, x):
        self._logits.clear()
        out = self.model(x)
        return self._logits[0], out["embedding"]

    def _features(self, waves, sample_rate):
        clips = [prepare(w, sample_rate, self.sample_rate, remove_dc=True, min_samples=2 * self.sample_rate)
                 for w in waves]
        out: list = [None] * len(clips)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            by_length.setdefault(c.shape[0], []).append(i)
        for _, ids in sorted(by_length.items()):
            res = self._run(torch.from_numpy(np.stack([clips[i] for i in ids])), self._forward)
            logits = torch.cat([r[0] for r in res])
            emb = torch.cat([r[1] for r in res])
            for j, i in enumerate(ids):
                out[i] = {"panns_logits": logits[j].numpy(), "panns_embedding": emb[j].numpy()}
        return out


# ----------------------------------------------------------------------------------- CLAP


class CLAP(Backbone):
    """LAION-CLAP through ``transformers.ClapModel`` (HTSAT audio tower, RoBERTa text tower).

    Audio is read at 48 kHz, peak-normalised to -1 dBFS and quantised to 16 bit as LAION-CLAP's
    documentation and stable-audio-metrics do; the processor makes the fused 10 s mel input (clips
    longer than 10 s get their random crops from a fixed seed, so scores are repeatable).
    """

    name, label, sample_rate, outputs = "clap", "LAION-CLAP", 48000, ("clap_audio",)

    @classmethod
    def check_path(cls, path: str) -> None:
        """A ``transformers`` folder: ``config.json`` and the weights of ``ClapModel``, and the processor."""
        if not path or not os.path.exists(path):
            raise FileNotFoundError(f"LAION-CLAP weights {path!r} do not exist: give the local transformers folder "
                                    f"(ClapModel + ClapProcessor save_pretrained, e.g. a copy of laion/clap-htsat-fused; "
                                    f"{README_HINT})")

        def has(*names: str) -> bool:
            return any(os.path.isfile(os.path.join(path, n)) for n in names)

        lacks = [what for what, names in (
            ("config.json", ("config.json",)),
            ("the model weights (model.safetensors)", ("model.safetensors", "model.safetensors.index.json",
                                                       "pytorch_model.bin")),
            ("the processor (preprocessor_config.json)", ("preprocessor_config.json", "processor_config.json")),
        ) if not os.path.isdir(path) or not has(*names)]
        if lacks:
            what = "is a file" if not os.path.isdir(path) else f"lacks {', '.join(lacks)}"
            raise FileNotFoundError(f"LAION-CLAP folder {path} {what}: it must be a transformers folder (ClapModel + "
                                    f"ClapProcessor save_pretrained, e.g. a copy of laion/clap-htsat-fused; {README_HINT})")

    @research_code_warnings_off()  # the packages warn while building their models
    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__(path, device, batch_size)
        from transformers import ClapModel, ClapProcessor

        self.check_path(path)
        with library_bars_off():
            self.model = ClapModel.from_pretrained(path, local_files_only=True).eval().to(self.device)
        self.processor = ClapProcessor.from_pretrained(path, local_files_only=True)
        self.sample_rate = int(self.processor.feature_extractor.sampling_rate)
        self.seed = seed

    def _features(self, waves, sample_rate):
        clips = []
        for w in waves:
            x = prepare(w, sample_rate, self.sample_rate, peak_db=-1.0)
            clips.append((np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16).astype(np.float32) / 32767.0)
        out = []
        for s in _batches(len(clips), self.batch_size):
            with numpy_seeded(self.seed):
                inputs = self.processor.feature_extractor(clips[s], sampling_rate=self.sample_rate, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            emb = self.model.get_audio_features(**inputs).pooler_output.float().cpu()  # [b, d], unit norm
            out.extend({"clap_audio": e.numpy()} for e in emb)
        return out

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """``[n, d]`` unit-norm text embeddings."""
        out = []
        texts = list(texts)
        for s in _batches(len(texts), self.batch_size):
            tok = self.processor.tokenizer(texts[s], padding=True, truncation=True, return_tensors="pt")
            tok = {k: v.to(self.device) for k, v in tok.items()}
            out.append(self.model.get_text_features(**tok).pooler_output.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim), np.float32)


# ----------------------------------------------------------------------------------- AudioBox-Aesthetics

AES_AXES = ("CE", "CU", "PC", "PQ")


class Aesthetics(Backbone):
    """Meta's AudioBox-Aesthetics predictor (``audiobox_aesthetics.model.aes.AesMultiOutput``).

    Reads the official ``checkpoint.pt`` (``state_dict``, ``model_cfg``, ``target_transform``), as
    ``audiobox_aesthetics.infer.AesPredictor`` does, without its hub fallback. A ``model_cfg``
    may carry ``wavlm_cfg`` (entries of the WavLM config to override): the package builds its
    WavLM from the module constant ``DEFAULT_AUDIO_CFG``, which is swapped for the construction
    only; the tiny test checkpoints use it, the official one has no such key.
    """

    name, label, sample_rate, outputs = "aesthetics", "AudioBox-Aesthetics", 16000, tuple(f"aes_{a.lower()}" for a in AES_AXES)
    weight_names = ("checkpoint.pt",)
    MODEL_KEYS = ("proj_num_layer", "proj_ln", "proj_act_fn", "proj_dropout", "nth_layer",
                  "use_weighted_layer_sum", "precision", "normalize_embed", "output_dim")

    @research_code_warnings_off()  # the packages warn while building their models
    def __init__(self, path: str, device: Optional[str] = None, batch_size: int = 16) -> None:
        super().__init__(path, device, batch_size)
        import re

        from audiobox_aesthetics.model import aes

        _, weights = read_checkpoint(path, self.label, {}, self.weight_names)
        try:
            ckpt = torch.load(weights, map_location="cpu", weights_only=True)
            cfg, transform = ckpt["model_cfg"], ckpt["target_transform"]
        except Exception as err:
            raise ValueError(f"{weights}: not an AudioBox-Aesthetics checkpoint.pt with state_dict / model_cfg / "
                             f"target_transform ({type(err).__name__}: {err})") from None
        kwargs = {k: cfg[k] for k in self.MODEL_KEYS if k in cfg} | {"target_transform": transform}
        default_cfg = aes.DEFAULT_AUDIO_CFG
        if cfg.get("wavlm_cfg"):
            merged = {k: v for k, v in vars(default_cfg).items()} | dict(cfg["wavlm_cfg"])
            aes.DEFAULT_AUDIO_CFG = aes.WavLMConfig(merged)
        try:
            model = aes.AesMultiOutput(**kwargs)
        finally:
            aes.DEFAULT_AUDIO_CFG = default_cfg
        model.load_state_dict({re.sub("^model.", "", k): v for k, v in ckpt["state_dict"].items()})
        self.model = model.eval().to(self.device)
        self.transform = {a: (float(transform[a]["mean"]), float(transform[a]["std"])) for a in AES_AXES}

    def _features(self, waves, sample_rate):
        from audiobox_aesthetics.infer import make_inference_batch

        clips = [torch.from_numpy(prepare(w, sample_rate, self.sample_rate))[None] for w in waves]  # [1, n]
        wavs, masks, weights, bids = make_inference_batch(clips, 10, 10, sample_rate=self.sample_rate)
        wavs, masks = torch.stack(wavs), torch.stack(masks)  # [W, 1, n], [W, 1, n]
        preds = {a: [] for a in AES_AXES}
        for s in _batches(wavs.shape[0], self.batch_size):
            p = self.model({"wav": wavs[s].to(self.device), "mask": masks[s].to(self.device)})
            for a in AES_AXES:
                mean, std = self.transform[a]
                preds[a].append(p[a].float().cpu() * std + mean)
        weights_t, bids_t = torch.tensor(weights, dtype=torch.float64), torch.tensor(bids)
        out = []
        for i in range(len(clips)):
            sel = bids_t == i
            row = {}
            for a in AES_AXES:
                v = torch.cat(preds[a]).double()
                row[f"aes_{a.lower()}"] = np.float32((v[sel] * weights_t[sel]).sum() / weights_t[sel].sum())
            out.append(row)
        return out


BACKBONES = {b.name: b for b in (OpenL3, PaSST, PANNs, CLAP, Aesthetics)}
