"""Audio around the generator: codes -> waveform (codec decoder), WAV files, the optional
upsampler hook, and waveform -> log-mel windows (the model listening through its encoder).

Codes are decoded with the same codec the data pipeline encodes with
(``megatron_ualm.data.codec``: X-Codec from a local checkpoint); log-mel windows come from the
data pipeline's ``LogMel`` so audio in at inference matches training features exactly.
"""

from __future__ import annotations

import os
from typing import Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from megatron_ualm.data.audio import AUDIO_IN_SAMPLE_RATE, AudioInConfig, LogMel
from megatron_ualm.data.codec import Codec, load_codec
from megatron_ualm.data.sequence import Message
from megatron_ualm.plugins import plugin_class


class CodecDecoder:
    """Turns ``[K, T]`` codes into mono waveforms with a codec's decoder.

    Args:
        codec: a loaded ``megatron_ualm.data.codec`` codec whose ``model`` has
            ``decode(codes [B, K, T]) -> [B, 1, T * hop]`` (``transformers.XcodecModel``).
    """

    def __init__(self, codec: Codec) -> None:
        if not hasattr(codec, "model") or not hasattr(codec.model, "decode"):
            raise ValueError(f"codec {codec.name!r} has no decoder model (needs .model.decode)")
        self.codec = codec
        self.sample_rate = codec.sample_rate
        self.frame_rate = codec.frame_rate
        self.samples_per_frame = codec.sample_rate // codec.frame_rate

    @classmethod
    def load(cls, path: str, name: str = "xcodec", device: Optional[str] = None) -> "CodecDecoder":
        """Loads a codec checkpoint from a local directory (``name``: registry name or
        ``package.module:ClassName``, as for the preprocessing tools)."""
        return cls(load_codec(name, path, device=device))

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Decodes clips; clips of equal length share one forward pass.

        Args:
            codes: ``[K, T_i]`` codes per clip (K <= the codec's quantizers).

        Returns:
            float32 ``[T_i * samples_per_frame]`` waveforms at ``sample_rate``.
        """
        out: list[Optional[np.ndarray]] = [None] * len(codes)
        by_length: dict[int, list[int]] = {}
        for i, c in enumerate(codes):
            if c.shape[1] == 0:
                out[i] = np.zeros(0, dtype=np.float32)
            else:
                by_length.setdefault(int(c.shape[1]), []).append(i)
        device = self.codec.device
        for _, ids in by_length.items():
            batch = torch.stack([codes[i].long() for i in ids]).to(device)  # [B, K, T]
            wave = self.codec.model.decode(batch, return_dict=False)  # [B, 1, n]
            for i, w in zip(ids, wave[:, 0].float().cpu().numpy()):
                out[i] = np.ascontiguousarray(w, dtype=np.float32)
        return out


@runtime_checkable
class Upsampler(Protocol):
    """Post-processing hook for decoded audio (the paper's enhancement VAE, 16 -> 48 kHz).

    An implementation is a class ``ClassName(path, device=None)`` (named on the command line
    as ``package.module:ClassName`` with ``--upsampler-path``) whose call maps one mono
    float32 waveform and its rate to a new waveform and rate.
    """

    def __call__(self, wave: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
        ...


def load_upsampler(spec: str, path: Optional[str] = None, device: Optional[str] = None) -> Upsampler:
    """Builds an upsampler from ``package.module:ClassName``."""
    hook = plugin_class(spec, "--upsampler")(path, device=device)
    if not callable(hook):
        raise ValueError(f"--upsampler {spec} is not callable as hook(wave, sample_rate)")
    return hook


def write_wav(path: str, wave: np.ndarray, sample_rate: int) -> str:
    """Writes mono float audio as 16-bit PCM WAV (clipped to [-1, 1]); returns the path."""
    import soundfile as sf

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0), int(sample_rate), subtype="PCM_16")
    return path


class AudioListener:
    """Waveform -> an audio-in message with its log-mel windows (the understanding path).

    Args:
        model_config: the ``UALMConfig`` (its encoder fixes mel bins and window length).
    """

    def __init__(self, model_config) -> None:
        self.config = AudioInConfig.from_model_config(model_config)
        self.logmel = LogMel(self.config)

    def message(self, wave: np.ndarray, sample_rate: int = AUDIO_IN_SAMPLE_RATE, role: str = "user"):
        """Builds the audio-in message of a clip.

        Args:
            wave: float32 ``[n]`` mono samples.
            sample_rate: their rate (resampled to 16 kHz when different).
            role: the message's role.

        Returns:
            ``(Message, features [w, n_mels, window], lengths [w])``.
        """
        wave = np.asarray(wave, dtype=np.float32)
        if sample_rate != AUDIO_IN_SAMPLE_RATE:
            import soxr

            wave = soxr.resample(wave, sample_rate, AUDIO_IN_SAMPLE_RATE, quality="HQ").astype(np.float32)
        if wave.size == 0:
            raise ValueError("cannot listen to an empty clip")
        valid = self.logmel.valid_windows(wave)
        features = self.logmel.pad_windows(valid)  # [w, n_mels, window]
        lengths = torch.tensor(self.config.frames_per_window(wave.shape[0]), dtype=torch.long)
        return Message(role, "audio", audio_in_frames=int(lengths.sum())), features, lengths
