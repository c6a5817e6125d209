"""Each backbone adapter runs its package's real architecture (random weights) from a local path."""

import sys

import numpy as np
import pytest

from megatron_ualm.evaluation import backbones
from megatron_ualm.tiny import backbones as tiny_models


def _clips(seconds=(0.5, 0.7, 0.5), rate=16000, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for s in seconds:
        t = np.arange(int(s * rate)) / rate
        out.append((0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


EXPECTED = {
    "openl3": {"openl3": (None, 512)},  # [frames, 512]
    "passt": {"passt_logits": (527,)},
    "panns": {"panns_logits": (527,), "panns_embedding": (2048,)},
    "clap": {"clap_audio": (32,)},
    "aesthetics": {"aes_ce": (), "aes_cu": (), "aes_pc": (), "aes_pq": ()},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_backbone_end_to_end(loaded_backbones, name):
    model = loaded_backbones[name]
    clips = _clips()
    feats = model.features(clips, 16000)
    assert len(feats) == len(clips)
    for f in feats:
        assert set(f) == set(EXPECTED[name])
        for key, shape in EXPECTED[name].items():
            assert all(want is None or got == want for got, want in zip(np.shape(f[key]), shape)), (key, np.shape(f[key]))
            assert np.isfinite(f[key]).all()
    key = next(iter(EXPECTED[name]))
    assert not np.allclose(feats[0][key], feats[1][key])  # different clips, different outputs
    again = model.features(clips[:1], 16000)[0]  # deterministic, and independent of the batch
    np.testing.assert_allclose(again[key], feats[0][key], rtol=1e-4, atol=1e-5)
    # The adapter resamples its input: the same clip given at 48 kHz lands close to the 16 kHz one.
    import soxr

    up = model.features([soxr.resample(clips[0], 16000, 48000)], 48000)[0]
    assert np.isfinite(up[key]).all() and np.shape(up[key]) == np.shape(feats[0][key])


def test_openl3_frames_follow_the_hop(loaded_backbones):
    # 0.5 s is centred into one 1 s window; 1.6 s at a 0.5 s hop gives 4 windows.
    f = loaded_backbones["openl3"].features(_clips((0.5, 1.6)), 16000)
    assert f[0]["openl3"].shape[0] == 1 and f[1]["openl3"].shape[0] == 4


def test_passt_windows_like_stable_audio_metrics():
    w = np.arange(25 * 10, dtype=np.float32)  # 25 s at a toy rate of 10 Hz: windows of 100, hop 50
    starts = [int(x[0]) for x in backbones.windows(w, 100, 50, min_fraction=0.15)]
    assert starts == [0, 50, 100, 150]
    short = backbones.windows(np.ones(30, np.float32), 100, 50, min_fraction=0.15)
    assert len(short) == 1 and short[0].shape == (100,) and short[0][30:].sum() == 0


def test_panns_models_import_without_the_package_init():
    """panns_inference/__init__ downloads AudioSet labels at import; the adapter never runs it."""
    backbones._panns_models()
    assert "panns_inference.config" not in sys.modules


def test_identity_changes_with_the_weights(tmp_path, loaded_backbones):
    p = tiny_models.write_tiny_passt(tmp_path / "a", seed=0)
    first = backbones.PaSST(p, device="cpu").identity
    tiny_models.write_tiny_passt(tmp_path / "a", seed=1)
    assert backbones.PaSST(p, device="cpu").identity != first


def test_missing_or_wrong_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="OpenL3 weights .*nope"):
        backbones.OpenL3(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="PANNs folder .* holds none of"):
        backbones.PANNs(str(tmp_path / "empty"), device="cpu")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt: cannot be read as a torch state dict"):
        backbones.PaSST(str(bad), device="cpu")
    with pytest.raises(ValueError, match="not an AudioBox-Aesthetics checkpoint"):
        backbones.Aesthetics(str(bad), device="cpu")
    with pytest.raises(FileNotFoundError, match="transformers folder"):
        backbones.CLAP(str(bad), device="cpu")
