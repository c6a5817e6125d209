"""Audio codecs that turn waveforms into K x T discrete codes (audio out).

``Codec`` is the interface the generation preprocessor uses; ``XCodec`` wraps
``transformers.XcodecModel`` loaded from a local checkpoint. Another codec (EnCodec, DAC)
plugs in as a ``Codec`` subclass named on the command line as ``package.module:ClassName``;
it is constructed as ``ClassName(path, device=..., num_codebooks=...)``.

``encode_audio_out`` is the one batching rule for a converted step of records: its clips are
encoded in length order, ``batch_size`` at a time, whichever process holds the codec (a CPU
worker, or the main process feeding a GPU). This module imports torch only where a model is
built, so the tools check a ``--codec-path`` before loading anything heavy.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.tokenizer import file_sha256
from megatron_ualm.plugins import plugin_class
from megatron_ualm.progress import library_bars_off


class CodecLoadError(ValueError):
    """A codec that cannot be built from what the user gave (path, class name, K)."""


class Codec(ABC):
    """A neural codec: mono waveforms at ``sample_rate`` -> codes ``[K, T]`` at ``frame_rate``."""

    name: str
    sample_rate: int
    frame_rate: int
    num_codebooks: int
    codebook_size: int

    @abstractmethod
    def num_frames(self, num_samples: int) -> int:
        """Frames the codec emits for a clip of ``num_samples`` samples."""

    @abstractmethod
    def encode(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encodes a batch of clips.

        Args:
            clips: float32 ``[n_i]`` mono waveforms at ``sample_rate``.

        Returns:
            int64 ``[K, num_frames(n_i)]`` codes per clip.
        """

    def identity(self) -> dict:
        """What a shard sidecar records about the codec."""
        return {
            "name": self.name,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
        }

    def spec(self) -> "Codec":
        """What CPU workers that only decode audio need of this codec (rates, frame counts, identity).

        When the codec runs in one process (a GPU) and workers prepare its input, the workers
        get this instead of the codec. The default is the codec itself, right for a codec
        without a model; a codec that holds one returns a ``CodecSpec`` so workers load nothing.
        """
        return self


class CodecSpec(Codec):
    """A codec's rates, frame arithmetic and identity without its model.

    Args:
        identity: the codec's ``identity()`` (name, rates, K, codebook size, ...).
        frames: ``num_samples -> frames``; picklable (workers may be spawned).
    """

    def __init__(self, identity: dict, frames: Callable[[int], int]):
        self._identity = dict(identity)
        self._frames = frames
        self.name = identity["name"]
        self.sample_rate = int(identity["sample_rate"])
        self.frame_rate = int(identity["frame_rate"])
        self.num_codebooks = int(identity["num_codebooks"])
        self.codebook_size = int(identity["codebook_size"])

    def num_frames(self, num_samples: int) -> int:
        return self._frames(num_samples)

    def encode(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError(f"{self.name}: this process holds only the codec's spec; clips are encoded by the "
                           "process that loaded the codec (encode_audio_out there)")

    def identity(self) -> dict:
        return dict(self._identity)


@dataclass(frozen=True)
class ConvFrames:
    """Frames of a strided conv stack over a clip padded by ``pad`` samples on each side.

    X-Codec's frame count is its HuBERT front end's: ``floor((n - k) / s) + 1`` per conv layer
    (``HubertModel._get_feat_extract_output_lengths``) after ``hop_length // 2`` padding.
    """

    pad: int
    kernels: tuple
    strides: tuple

    def __call__(self, num_samples: int) -> int:
        length = int(num_samples) + 2 * self.pad
        for k, s in zip(self.kernels, self.strides):
            length = (length - k) // s + 1
        return max(length, 0)


def check_checkpoint_dir(path: Optional[str], what: str = "codec", model_type: Optional[str] = None) -> None:
    """Checks that ``path`` is a local ``save_pretrained`` directory before anything loads it.

    ``from_pretrained`` on a missing local path falls through to the model hub and reports an
    invalid "repo id"; this says what is wrong with the directory instead.

    Raises:
        CodecLoadError: missing path, a file, no or unreadable ``config.json``, another model
            type, or no weights file.
    """
    hint = "give the local directory of a save_pretrained checkpoint (config.json + model.safetensors)"
    if not path:
        raise CodecLoadError(f"no --codec-path given for the {what}; {hint}")
    if not os.path.exists(path):
        raise CodecLoadError(f"--codec-path {path} does not exist; {hint}")
    if not os.path.isdir(path):
        raise CodecLoadError(f"--codec-path {path} is a file, not a checkpoint directory; {hint}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise CodecLoadError(f"--codec-path {path} has no config.json, so it holds no {what} checkpoint; {hint}")
    try:
        with open(config) as f:
            found = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise CodecLoadError(f"{config} is not a readable JSON config ({err})") from None
    if model_type is not None and found != model_type:
        raise CodecLoadError(f"--codec-path {path} holds a {found!r} checkpoint (config.json model_type), "
                             f"not {model_type!r}: point it at the {what} checkpoint")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES) and not any(
            f.endswith((".safetensors", ".safetensors.index.json", ".bin.index.json")) for f in os.listdir(path)):
        raise CodecLoadError(f"--codec-path {path} has a config.json but no weights ({' or '.join(WEIGHT_FILES)})")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class XCodec(Codec):
    """X-Codec through ``transformers.XcodecModel``, batched, on GPU when there is one.

    Only clips of equal length share a forward pass: X-Codec's HuBERT front end normalises
    over the whole time axis (group norm), so zero padding would change every frame's code,
    not just the last ones. Corpora of fixed-length clips (the common case) batch fully.

    Args:
        path: local directory of a ``save_pretrained`` X-Codec checkpoint.
        device: torch device; None picks ``cuda`` when available.
        num_codebooks: K to keep (the first K RVQ levels); None: all of the model's quantizers.

    Raises:
        CodecLoadError: ``path`` is not an X-Codec checkpoint directory, or K is out of range.
    """

    name = "xcodec"

    def __init__(self, path: str, device: Optional[str] = None, num_codebooks: Optional[int] = None):
        import torch
        from transformers import XcodecModel

        check_checkpoint_dir(path, "X-Codec", model_type="xcodec")
        self.path = str(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with library_bars_off():  # each preprocessing worker loads its own copy
            self.model = XcodecModel.from_pretrained(self.path).eval().to(self.device)
        cfg = self.model.config
        self.sample_rate = int(cfg.sample_rate)
        self.frame_rate = int(cfg.frame_rate)
        self.codebook_size = int(cfg.codebook_size)
        available = int(cfg.num_quantizers)
        self.num_codebooks = available if num_codebooks is None else int(num_codebooks)
        if not 1 <= self.num_codebooks <= available:
            raise CodecLoadError(f"X-Codec at {path} has {available} quantizers; --num-codebooks {num_codebooks} "
                                 f"must be 1..{available}")
        self._bandwidth = self._bandwidth_for(self.num_codebooks)
        semantic = cfg.semantic_model_config
        self._frames = ConvFrames(int(self.model.pad), tuple(semantic.conv_kernel), tuple(semantic.conv_stride))
        self._sha: Optional[str] = None

    def _bandwidth_for(self, k: int) -> float:
        """The smallest configured bandwidth that yields at least ``k`` quantizers."""
        rvq = self.model.quantizer
        for bw in sorted(self.model.config.target_bandwidths):
            if rvq.get_num_quantizers_for_bandwidth(bw) >= k:
                return bw
        return self.model.config.target_bandwidths[-1]

    def num_frames(self, num_samples: int) -> int:
        return self._frames(num_samples)

    def encode(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        out: list[Optional[np.ndarray]] = [None] * len(clips)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            by_length.setdefault(int(c.shape[0]), []).append(i)
        with torch.inference_mode():
            for length, ids in by_length.items():
                batch = torch.from_numpy(np.stack([clips[i] for i in ids]))[:, None, :]  # [B, 1, n]
                codes = self.model.encode(batch.to(self.device), bandwidth=self._bandwidth, return_dict=False)
                codes = codes[:, : self.num_codebooks].cpu().numpy().astype(np.int64)  # [B, K, T]
                for i, c in zip(ids, codes):
                    out[i] = c
        return out

    def identity(self) -> dict:
        if self._sha is None:  # hashed once, on first use (the main process; workers get a spec)
            weights = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(self.path, f))]
            self._sha = file_sha256(os.path.join(self.path, weights[0])) if weights else ""
        return {**super().identity(), "path": self.path, "sha256": self._sha or None}

    def spec(self) -> CodecSpec:
        return CodecSpec(self.identity(), self._frames)


CODECS = {"xcodec": XCodec}


def load_codec(name: str, path: str, device: Optional[str] = None, num_codebooks: Optional[int] = None) -> Codec:
    """Builds a codec by registry name (``xcodec``) or ``package.module:ClassName``.

    Args:
        name: the codec.
        path: its local checkpoint.
        device: torch device (None: cuda when available).
        num_codebooks: K to keep (None: the codec's own).

    Raises:
        CodecLoadError: unknown name, a class that cannot be imported or is not a ``Codec``, or
            a checkpoint the codec refuses.
    """
    if name in CODECS:
        cls = CODECS[name]
    elif ":" in name:
        try:
            cls = plugin_class(name, "--codec", Codec)
        except ValueError as err:
            raise CodecLoadError(str(err)) from None
    else:
        raise CodecLoadError(f"unknown codec {name!r}; choose one of {sorted(CODECS)} or give package.module:ClassName")
    return cls(path, device=device, num_codebooks=num_codebooks)


Converted = tuple[str, Any]  # (source, list[Segment] | RecordError), as Converter.convert_batch returns


def encode_audio_out(converted: list[Converted], codec: Codec, batch_size: int) -> list[Converted]:
    """Fills in the codes of every audio-out message that still holds a waveform (in place).

    The batching rule: the step's clips in length order (stable, in record and message order
    among equal lengths), ``batch_size`` per codec call (the codec groups equal lengths inside
    a call). Everything that encodes a converted step uses this, so a clip meets the same batch
    whichever process runs the codec.

    Args:
        converted: ``(source, segments | RecordError)`` of one step of records; an audio-out
            message still to encode holds float32 samples ``[n]`` at ``codec.sample_rate``.
        codec: the codec.
        batch_size: clips per codec call.

    Returns:
        ``converted``, with int64 codes ``[K, T]`` in place of the waveforms.
    """
    pending = [s for _, segs in converted if not isinstance(segs, RecordError)
               for s in segs if s.kind == "audio_out" and s.data.dtype == np.float32]
    pending.sort(key=lambda s: s.data.shape[0])  # equal lengths end up in one call
    for b in range(0, len(pending), batch_size):
        chunk = pending[b:b + batch_size]
        for s, codes in zip(chunk, codec.encode([s.data for s in chunk])):
            s.data = codes
    return converted
