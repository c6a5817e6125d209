"""Audio decoding, the audio-in windowing rule, and the frozen encoder's log-mel features.

Audio in (understanding) is read by a Whisper-family encoder: 16 kHz mono, log-mel frames at
100 Hz (hop 160), fixed windows (30 s = 3000 mel frames for the real flavors). The encoder
emits 25 Hz frames, one ``<|audio_in|>`` placeholder each. A clip longer than one window is
split into consecutive windows; ``n`` samples of a window give ``ceil(n / 640)`` frames.

Features of a window are Whisper's (``transformers.WhisperFeatureExtractor``) on the
zero-padded window, with every mel frame past the window's valid 25 Hz frames set to the
window's silence floor ``max(-1.5, max - 2)``, the value Whisper gives padding after its 8 dB
(in log10 units) dynamic-range clamp. Stating it this way lets shards store only the valid
mel frames and rebuild the same padded window at training time.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megatron_ualm.data.errors import RecordError

AUDIO_IN_SAMPLE_RATE = 16000
"""Sample rate the audio encoder reads."""

MEL_HOP = 160
"""Samples per log-mel frame (100 Hz at 16 kHz)."""

SAMPLES_PER_AUDIO_IN_FRAME = 640
"""Samples per 25 Hz encoder frame (= one placeholder)."""

MEL_PER_AUDIO_IN_FRAME = SAMPLES_PER_AUDIO_IN_FRAME // MEL_HOP


AUDIO_DECODERS = ("soundfile", "dali", "auto")


def dali_available() -> bool:
    """True when NVIDIA DALI imports (``nvidia-dali-cuda130``; its CPU pipeline needs no GPU)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _dali_pipeline():
    """A CPU DALI pipeline (built once per process): encoded bytes -> mono float32 + rate.

    DALI only decodes and downmixes here. Its ``sample_rate=`` resampling was measured to alias
    when downsampling (44.1 kHz white noise above 8 kHz folded into a 16 kHz output at full
    strength, ``quality=100`` too), so resampling stays with soxr's band-limited HQ filter.
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1,
                  exec_async=False, exec_pipelined=False)
    def decode():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        audio, rate = fn.decoders.audio(encoded, dtype=types.FLOAT, downmix=True)
        return audio, rate

    pipe = decode()
    pipe.build()
    return pipe


def _decode_dali(data: bytes) -> tuple[np.ndarray, int]:
    """The whole clip, mono float32 at its own rate, through DALI."""
    pipe = _dali_pipeline()
    pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
    audio, rate = pipe.run()
    return np.array(audio[0], dtype=np.float32).reshape(-1), int(np.array(rate[0]).reshape(-1)[0])


END_TOLERANCE_SECONDS = 0.01
"""How far an ``end`` may lie past the clip's end (timestamps rounded to 10 ms) before it is an error."""


def _clip_span(start: Optional[float], end: Optional[float], frames: int, rate: int, name: str) -> tuple[int, int]:
    """Samples ``[first, last)`` of ``start`` / ``end`` in a clip of ``frames`` samples at ``rate``.

    Raises:
        RecordError: ``start`` at or past the clip's end, or ``end`` more than
            ``END_TOLERANCE_SECONDS`` past it (never cut silently); the error says how long the clip is.
    """
    first = int(round((start or 0.0) * rate))
    if first >= frames:
        raise RecordError(f"start={start} s is past the end of {name} ({frames / rate:.3f} s long)", "start")
    if end is None:
        return first, frames
    last = int(round(end * rate))
    if last > frames + round(END_TOLERANCE_SECONDS * rate):
        raise RecordError(f"end={end} s is past the end of {name} ({frames / rate:.3f} s long); give an end "
                          "within the clip, or none to read to its end", "end")
    return first, min(last, frames)


def load_audio(
    source: Union[str, bytes],
    sample_rate: int,
    start: Optional[float] = None,
    end: Optional[float] = None,
    field: str = "audio",
    decoder: str = "soundfile",
) -> np.ndarray:
    """Decodes a clip (WAV/FLAC/OGG/MP3), downmixes to mono and resamples.

    Args:
        source: a file path or the encoded file's bytes.
        sample_rate: the output rate.
        start: clip start in seconds (None: the beginning).
        end: clip end in seconds (None: the end of the file); at most ``END_TOLERANCE_SECONDS``
            past the end of the file.
        field: the manifest field named in errors about the audio itself.
        decoder: ``soundfile`` (libsndfile decode), ``dali`` (NVIDIA DALI's decoder), or
            ``auto`` (DALI where installed, else soundfile); soxr HQ resamples in every case.

    Returns:
        float32 ``[n]`` samples in [-1, 1].

    Raises:
        RecordError: the file is missing, empty ("empty audio", field ``field``) or cannot be
            decoded, or ``start`` / ``end`` (named as the field) lie outside the clip.
    """
    import soundfile as sf
    import soxr

    if decoder not in AUDIO_DECODERS:
        raise ValueError(f"decoder={decoder!r}: choose one of {AUDIO_DECODERS}")
    if decoder == "auto":
        decoder = "dali" if dali_available() else "soundfile"
    if isinstance(source, (bytes, bytearray, memoryview)):
        handle, name = io.BytesIO(bytes(source)), getattr(source, "name", "<bytes>")  # a corpus member's name
        if not len(source):
            raise RecordError("empty audio: the record's audio bytes are empty", field)
    elif isinstance(source, str):
        handle, name = source, source
        import os

        if not os.path.exists(source):
            raise RecordError(f"audio file {source} does not exist", field)
        if os.path.isfile(source) and os.path.getsize(source) == 0:
            raise RecordError(f"empty audio: {source} is an empty file (0 bytes)", field)
    else:
        raise RecordError(
            f"expected a file path (string) or the file's bytes, got {type(source).__name__}", field
        )
    for key, value in (("start", start), ("end", end)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                  or not math.isfinite(value) or value < 0):
            raise RecordError(f"must be a non-negative number of seconds, got {value!r}", key)
    if start is not None and end is not None and end <= start:
        raise RecordError(f"end={end} must be after start={start}", "end")
    if decoder == "dali":
        return _load_dali(handle, name, sample_rate, start, end, field)
    try:
        with sf.SoundFile(handle) as snd:
            rate = snd.samplerate
            if snd.frames == 0:
                raise RecordError(f"empty audio: {name} holds no samples", field)
            first, last = _clip_span(start, end, snd.frames, rate, name)
            if first:
                snd.seek(first)
            data = snd.read(last - first, dtype="float32", always_2d=True)  # [n, channels]
    except RecordError:
        raise
    except Exception as err:  # libsndfile reports every decode failure as a generic error
        # Its own text without its prefix, which names the file object (<_io.BytesIO object at 0x...>).
        reason = getattr(err, "error_string", None) or str(err)
        raise RecordError(f"cannot decode audio {name}: {reason}", field) from None
    if data.shape[0] == 0:
        raise RecordError(f"audio {name} has no samples in the requested range", field)
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(mono).all():
        raise RecordError(f"audio {name} decodes to non-finite samples", field)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _load_dali(handle, name: str, sample_rate: int, start: Optional[float], end: Optional[float],
               field: str) -> np.ndarray:
    """``load_audio`` through DALI: decode the whole clip, cut, resample with soxr."""
    if isinstance(handle, io.BytesIO):
        data = handle.getvalue()
    else:
        with open(handle, "rb") as f:
            data = f.read()
    import soxr

    try:
        mono, rate = _decode_dali(data)
    except Exception as err:  # DALI reports decode failures as RuntimeError with its own text
        _dali_pipeline.cache_clear()  # a pipeline that hit an error stays broken: build anew
        reason = next((line.strip() for line in str(err).splitlines() if "rror" in line and "pipeline" not in line),
                      str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise RecordError(f"cannot decode audio {name}: {reason}", field) from None
    if mono.shape[0] == 0:
        raise RecordError(f"empty audio: {name} holds no samples", field)
    first, last = _clip_span(start, end, mono.shape[0], rate, name)
    mono = mono[first:last]
    if mono.shape[0] == 0:
        raise RecordError(f"audio {name} has no samples in the requested range", field)
    if not np.isfinite(mono).all():
        raise RecordError(f"audio {name} decodes to non-finite samples", field)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1] (the inverse of how shards store audio in)."""
    return pcm.astype(np.float32) / 32767.0


@dataclass(frozen=True)
class AudioInConfig:
    """Shape of the frozen encoder's input windows.

    Args:
        n_mels: mel bins (128 for AF-Whisper, 16 for the debug flavor).
        window_seconds: seconds per encoder window (30 for AF-Whisper, 2 for debug).
    """

    n_mels: int = 128
    window_seconds: int = 30

    @classmethod
    def from_model_config(cls, config) -> "AudioInConfig":
        """The windows a ``UALMConfig``'s encoder reads: ``2 * max_source_positions`` mel frames."""
        enc = config.audio_encoder_config or {}
        window_mel = 2 * int(enc.get("max_source_positions", 1500))
        return cls(n_mels=int(enc.get("num_mel_bins", 128)), window_seconds=window_mel * MEL_HOP // AUDIO_IN_SAMPLE_RATE)

    @property
    def window_samples(self) -> int:
        return self.window_seconds * AUDIO_IN_SAMPLE_RATE

    @property
    def window_mel_frames(self) -> int:
        return self.window_samples // MEL_HOP

    @property
    def window_frames(self) -> int:
        """25 Hz frames of a full window."""
        return self.window_samples // SAMPLES_PER_AUDIO_IN_FRAME

    def frames_per_window(self, num_samples: int) -> list[int]:
        """25 Hz frames of each window of a ``num_samples``-sample clip (the placeholder rule)."""
        out = []
        for begin in range(0, num_samples, self.window_samples):
            n = min(self.window_samples, num_samples - begin)
            out.append(-(-n // SAMPLES_PER_AUDIO_IN_FRAME))
        return out

    def frames_per_mel_window(self, num_mel_frames: int) -> list[int]:
        """25 Hz frames of each window of stored valid mel frames (``4`` mel frames each)."""
        return [
            min(self.window_mel_frames, num_mel_frames - b) // MEL_PER_AUDIO_IN_FRAME
            for b in range(0, num_mel_frames, self.window_mel_frames)
        ]


class LogMel:
    """Whisper log-mel features per encoder window (see the module docstring for the rule).

    Args:
        config: the window shape.
        device: where the STFT runs (``"cpu"`` or ``"cuda"``).
    """

    def __init__(self, config: AudioInConfig, device: str = "cpu"):
        from transformers import WhisperFeatureExtractor

        self.config = config
        self.device = device
        extractor = WhisperFeatureExtractor(
            feature_size=config.n_mels,
            sampling_rate=AUDIO_IN_SAMPLE_RATE,
            hop_length=MEL_HOP,
            chunk_length=config.window_seconds,
        )
        # Whisper's own filters and STFT settings; the maths follows its torch feature path.
        self._n_fft = extractor.n_fft
        self._filters = torch.from_numpy(extractor.mel_filters).float().T.contiguous().to(device)  # [n_mels, bins]
        self._window = torch.hann_window(self._n_fft, device=device)

    def valid_windows(self, samples: np.ndarray) -> list[np.ndarray]:
        """The valid mel frames of each window of a 16 kHz clip.

        Equal to Whisper's features of the zero-padded window on those frames, but computed
        over the clip (plus the zeros its last frames see) instead of the whole padded window:
        a 10 s clip in a 30 s window costs a third. Frames past the clip hold only zeros
        (log10 floor -10), so the window's maximum, which sets the 8-unit clamp, is reached
        within the frames computed here.

        Args:
            samples: float32 ``[n]``.

        Returns:
            one float32 ``[n_mels, 4 * frames_w]`` array per window.
        """
        W = self.config.window_samples
        out = []
        for begin, frames in zip(range(0, samples.shape[0], W), self.config.frames_per_window(samples.shape[0])):
            w = torch.from_numpy(np.ascontiguousarray(samples[begin:begin + W], dtype=np.float32))
            m = frames * MEL_PER_AUDIO_IN_FRAME
            if w.shape[0] < W:
                # Zeros for every STFT frame that overlaps the clip; reflection then mirrors zeros.
                padded = torch.zeros(min(W, m * MEL_HOP + 2 * self._n_fft))
                padded[: w.shape[0]] = w
                w = padded
            stft = torch.stft(w.to(self.device), self._n_fft, MEL_HOP, window=self._window, return_complex=True)
            power = stft[:, :-1].abs().square()  # [n_fft // 2 + 1, frames]
            log_spec = (self._filters @ power).clamp(min=1e-10).log10()  # [n_mels, frames]
            log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
            out.append(((log_spec[:, :m] + 4.0) / 4.0).cpu().numpy())
        return out

    def pad_windows(self, valid: Sequence[np.ndarray]) -> torch.Tensor:
        """Full encoder windows from valid mel frames.

        Args:
            valid: ``[n_mels, m_w]`` arrays, ``m_w <= window_mel_frames``.

        Returns:
            float32 ``[n, n_mels, window_mel_frames]``.
        """
        return pad_mel_windows(valid, self.config)


def pad_mel_windows(valid: Sequence[np.ndarray], config: AudioInConfig) -> torch.Tensor:
    """Pads valid mel frames of each window with that window's silence floor.

    Args:
        valid: ``[n_mels, m_w]`` arrays.
        config: the window shape.

    Returns:
        float32 ``[n, n_mels, window_mel_frames]``.
    """
    out = torch.empty(len(valid), config.n_mels, config.window_mel_frames)
    for i, v in enumerate(valid):
        t = torch.from_numpy(np.asarray(v, dtype=np.float32))
        m = t.shape[1]
        out[i, :, :m] = t
        out[i, :, m:] = max(-1.5, float(t.max()) - 2.0) if m else -1.5
    return out
