"""The frozen audio encoder (Whisper family from ``transformers``) for audio-in features."""

from __future__ import annotations

import torch

from megatron_ualm.config import UALMConfig
from megatron_ualm.progress import library_bars_off


def _encoder_classes(kind: str):
    """(model class, config class, output frames per second) of an encoder type."""
    if kind == "qwen2_audio":
        from transformers import Qwen2AudioEncoderConfig
        from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

        return Qwen2AudioEncoder, Qwen2AudioEncoderConfig, 25
    if kind == "audioflamingo3":
        from transformers.models.audioflamingo3.modeling_audioflamingo3 import (
            AudioFlamingo3Encoder,
            AudioFlamingo3EncoderConfig,
        )

        return AudioFlamingo3Encoder, AudioFlamingo3EncoderConfig, 25
    if kind == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperEncoder, WhisperConfig, 50
    raise ValueError(f"unknown audio encoder type {kind!r}")


def encoder_hf_config(config: UALMConfig):
    """The ``transformers`` config of the model's encoder (from its path, else its fields)."""
    _, config_cls, _ = _encoder_classes(config.audio_encoder_type)
    if config.audio_encoder_path is not None:
        return config_cls.from_pretrained(config.audio_encoder_path)
    return config_cls(**config.audio_encoder_config)


def window_geometry(config: UALMConfig) -> tuple[int, int, int]:
    """(mel bins, mel frames per window, adapter frames per window) of the model's encoder."""
    hf = encoder_hf_config(config)
    window = 2 * hf.max_source_positions  # the conv stem halves the 100 Hz mel rate
    return hf.num_mel_bins, window, window * config.audio_in_frame_rate // 100


class FrozenAudioEncoder(torch.nn.Module):
    """A pretrained Whisper-style encoder, frozen and always in eval mode.

    Input is a batch of log-mel windows ``[n, n_mels, window]`` (100 mel frames per second,
    padded to the encoder's fixed window); output is ``[n, frames, d]`` at ``frame_rate`` Hz.
    Weights come from ``config.audio_encoder_path`` (a local ``save_pretrained`` directory of
    the encoder) or, without a path, a seeded random init (tests, benchmarks).

    Args:
        config: model config (``audio_encoder_type``, ``audio_encoder_config``,
            ``audio_encoder_path``).
    """

    def __init__(self, config: UALMConfig):
        super().__init__()
        model_cls, config_cls, self.frame_rate = _encoder_classes(config.audio_encoder_type)
        if config.audio_encoder_path is not None:
            with library_bars_off():  # every rank builds the encoder
                self.model = model_cls.from_pretrained(config.audio_encoder_path)
        else:
            self.model = model_cls(config_cls(**config.audio_encoder_config))
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.to(config.params_dtype)  # transformers builds in float32; the adapter runs in params_dtype
        hf = self.model.config
        self.hidden_size = hf.d_model
        self.num_mel_bins = hf.num_mel_bins
        self.window_mel_frames = 2 * hf.max_source_positions  # conv stem halves the mel rate
        self.frames_per_window = self.window_mel_frames * self.frame_rate // 100

    def train(self, mode: bool = True) -> "FrozenAudioEncoder":
        """Stays in eval mode: the encoder is frozen, dropout never applies."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[n, n_mels, window] -> [n, frames_per_window, d]``."""
        if features.shape[1:] != (self.num_mel_bins, self.window_mel_frames):
            raise ValueError(
                f"audio_in_features must be [n, {self.num_mel_bins}, {self.window_mel_frames}] "
                f"(mel bins, one padded window), got {tuple(features.shape)}"
            )
        dtype = next(self.model.parameters()).dtype
        return self.model(features.to(dtype)).last_hidden_state
