"""Audio codecs that turn waveforms into K x T discrete codes (audio out).

``Codec`` is the interface the generation preprocessor uses; ``XCodec`` wraps
``transformers.XcodecModel`` loaded from a local checkpoint. Another codec (EnCodec, DAC)
plugs in as a ``Codec`` subclass named on the command line as ``package.module:ClassName``;
it is constructed as ``ClassName(path, device=..., num_codebooks=...)``.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_ualm.data.tokenizer import file_sha256


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


class XCodec(Codec):
    """X-Codec through ``transformers.XcodecModel``, batched, on GPU when there is one.

    Only clips of equal length share a forward pass: X-Codec's HuBERT front end normalises
    over the whole time axis (group norm), so zero padding would change every frame's code,
    not just the last ones. Corpora of fixed-length clips (the common case) batch fully.

    Args:
        path: local directory of a ``save_pretrained`` X-Codec checkpoint.
        device: torch device; None picks ``cuda`` when available.
        num_codebooks: K to keep (the first K RVQ levels); None: all of the model's quantizers.
    """

    name = "xcodec"

    def __init__(self, path: str, device: Optional[str] = None, num_codebooks: Optional[int] = None):
        from transformers import XcodecModel

        self.path = str(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = XcodecModel.from_pretrained(self.path).eval().to(self.device)
        cfg = self.model.config
        self.sample_rate = int(cfg.sample_rate)
        self.frame_rate = int(cfg.frame_rate)
        self.codebook_size = int(cfg.codebook_size)
        available = int(cfg.num_quantizers)
        self.num_codebooks = available if num_codebooks is None else int(num_codebooks)
        if not 1 <= self.num_codebooks <= available:
            raise ValueError(f"X-Codec at {path} has {available} quantizers; asked for {num_codebooks}")
        self._bandwidth = self._bandwidth_for(self.num_codebooks)
        weights = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(self.path, f))]
        self._sha = file_sha256(os.path.join(self.path, weights[0])) if weights else None

    def _bandwidth_for(self, k: int) -> float:
        """The smallest configured bandwidth that yields at least ``k`` quantizers."""
        rvq = self.model.quantizer
        for bw in sorted(self.model.config.target_bandwidths):
            if rvq.get_num_quantizers_for_bandwidth(bw) >= k:
                return bw
        return self.model.config.target_bandwidths[-1]

    def num_frames(self, num_samples: int) -> int:
        pad = self.model.pad
        length = self.model.semantic_model._get_feat_extract_output_lengths(
            torch.tensor(num_samples + 2 * pad)
        )
        return int(length)

    @torch.inference_mode()
    def encode(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[Optional[np.ndarray]] = [None] * len(clips)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(clips):
            by_length.setdefault(int(c.shape[0]), []).append(i)
        for length, ids in by_length.items():
            batch = torch.from_numpy(np.stack([clips[i] for i in ids]))[:, None, :]  # [B, 1, n]
            codes = self.model.encode(batch.to(self.device), bandwidth=self._bandwidth, return_dict=False)
            codes = codes[:, : self.num_codebooks].cpu().numpy().astype(np.int64)  # [B, K, T]
            for i, c in zip(ids, codes):
                out[i] = c
        return out

    def identity(self) -> dict:
        return {**super().identity(), "path": self.path, "sha256": self._sha}


CODECS = {"xcodec": XCodec}


def load_codec(name: str, path: str, device: Optional[str] = None, num_codebooks: Optional[int] = None) -> Codec:
    """Builds a codec by registry name (``xcodec``) or ``package.module:ClassName``.

    Args:
        name: the codec.
        path: its local checkpoint.
        device: torch device (None: cuda when available).
        num_codebooks: K to keep (None: the codec's own).
    """
    if name in CODECS:
        cls = CODECS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, Codec)):
            raise ValueError(f"--codec {name} is not a megatron_ualm.data.codec.Codec subclass")
    else:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)} or give package.module:ClassName")
    return cls(path, device=device, num_codebooks=num_codebooks)
