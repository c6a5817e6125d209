"""Codes -> waveform -> 16 kHz WAV, the upsampler hook, and listening (waveform -> prompt)."""

import numpy as np
import soundfile as sf
import torch

from megatron_ualm.inference import CodecDecoder, write_wav


class TripleRate:
    """A real (if naive) upsampler implementing the hook: linear interpolation x3."""

    def __init__(self, path=None, device=None):
        self.factor = 3

    def __call__(self, wave, sample_rate):
        n = len(wave)
        x = np.linspace(0, n - 1, n * self.factor)
        return np.interp(x, np.arange(n), wave).astype(np.float32), sample_rate * self.factor


def test_decoded_wav_has_the_right_length_and_rate(codec_dir, tmp_path):
    codec = CodecDecoder.load(codec_dir, device="cpu")
    assert codec.sample_rate == 16000 and codec.samples_per_frame == 320
    codes = [torch.randint(0, 64, (8, 50)), torch.randint(0, 64, (8, 7)), torch.randint(0, 64, (8, 50))]
    waves = codec.decode(codes)
    assert [len(w) for w in waves] == [16000, 7 * 320, 16000]
    assert np.abs(waves[0]).max() > 0 and not np.allclose(waves[0], waves[2])
    path = write_wav(str(tmp_path / "a.wav"), waves[0], codec.sample_rate)
    data, rate = sf.read(path)
    assert rate == 16000 and data.shape == (16000,)
    np.testing.assert_allclose(data, np.clip(waves[0], -1, 1), atol=1 / 16000 + 1e-4)


def test_upsampler_hook_runs_after_the_codec(ualm):
    from megatron_ualm.inference.audio import Upsampler, load_upsampler

    hook = load_upsampler(f"{__name__}:TripleRate")
    assert isinstance(hook, Upsampler)
    ualm.upsampler = hook
    try:
        waves, rate = ualm.decode_audio([torch.randint(0, 64, (8, 10))])
    finally:
        ualm.upsampler = None
    assert rate == 48000 and len(waves[0]) == 3 * 3200
