"""The scorer interface (INTERFACES.md "Scorers") with the real CLAP and aesthetics code."""

import numpy as np
import pytest

from megatron_ualm.evaluation import metrics
from megatron_ualm.evaluation.scorers import AestheticsScorer, ClapScorer, Scorer, load_scorer


class ConstantScorer(Scorer):
    """A plug-in: loaded by package.module:ClassName."""

    name = "constant"

    def __init__(self, path, device=None):
        self.path, self.device = path, device

    def score(self, waves, sample_rate, texts=None):
        return {"constant": np.full(len(waves), float(len(self.path)))}


def _waves(n=3, rate=16000):
    rng = np.random.default_rng(7)
    return [(0.2 * rng.standard_normal(int(rate * (0.4 + 0.1 * i)))).astype(np.float32) for i in range(n)]


def test_clap_scorer(tiny_backbones):
    scorer = load_scorer("clap", tiny_backbones["clap"], device="cpu")
    assert isinstance(scorer, ClapScorer) and scorer.needs_text and scorer.sample_rate == 48000
    waves, texts = _waves(), ["a dog barks", "rain on a roof", "a car passes by"]
    out = scorer.score(waves, 16000, texts)
    assert set(out) == {"clap"} and out["clap"].dtype == np.float64 and out["clap"].shape == (3,)
    assert np.all(np.abs(out["clap"]) <= 1 + 1e-6)
    # It is the cosine of the backbone's audio and text embeddings.
    audio = np.stack([f["clap_audio"] for f in scorer.backbone.features(waves, 16000)])
    np.testing.assert_allclose(out["clap"], metrics.clap_score(audio, scorer.backbone.text_embeddings(texts)), atol=1e-6)
    assert not np.allclose(scorer.score(waves, 16000, texts[::-1])["clap"], out["clap"])
    with pytest.raises(ValueError, match="one text per clip"):
        scorer.score(waves, 16000)


def test_clap_does_not_disturb_numpy_global_rng(tiny_backbones):
    scorer = load_scorer("clap", tiny_backbones["clap"], device="cpu")
    np.random.seed(123)
    want = np.random.rand()
    np.random.seed(123)
    scorer.score([np.zeros(48000 * 11, np.float32) + 0.01], 48000, ["long clip, random crops"])
    assert np.random.rand() == want


def test_aesthetics_scorer(tiny_backbones):
    scorer = load_scorer("aesthetics", tiny_backbones["aesthetics"], device="cpu")
    assert isinstance(scorer, AestheticsScorer) and not scorer.needs_text
    out = scorer.score(_waves(), 16000)
    assert set(out) == {"aes_ce", "aes_cu", "aes_pc", "aes_pq", "aes"}
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in out.values())
    np.testing.assert_allclose(out["aes"], np.mean([out[k] for k in ("aes_ce", "aes_cu", "aes_pc", "aes_pq")], axis=0))
    # A 25 s clip is scored on three 10 s windows weighted by length (the package's predictor).
    long = scorer.score([np.tile(_waves(1)[0], 63)], 16000)
    assert np.isfinite(long["aes"]).all()


def test_plugin_and_bad_specs(tmp_path):
    s = load_scorer("tests.evaluation.test_scorers:ConstantScorer", "abc", device="cpu")
    assert s.score(_waves(2), 16000)["constant"].tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="package.module:ClassName"):
        load_scorer("nonsense", "x")
    with pytest.raises(ValueError, match="cannot import Thing from no_such_module_xyz"):
        load_scorer("no_such_module_xyz:Thing", "x")
    with pytest.raises(ValueError, match="is not a megatron_ualm.evaluation.scorers.Scorer subclass"):
        load_scorer("numpy:ndarray", "x")


@pytest.mark.parametrize("name", ["openl3", "passt", "panns", "clap", "aesthetics"])
def test_backbones_and_scorers_build_without_the_packages_warnings(tiny_backbones, name, tmp_path):
    """The research packages' deprecation warnings while building their models (AudioBox-Aesthetics'
    ``weight_norm``, ...) are not the user's to act on: not when a scorer or backbone is made, nor
    when a tiny one is written."""
    import warnings

    from megatron_ualm.evaluation.backbones import BACKBONES
    from megatron_ualm.tiny import backbones as tiny_models

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BACKBONES[name](tiny_backbones[name], device="cpu")
        if name in ("clap", "aesthetics"):
            (ClapScorer if name == "clap" else AestheticsScorer)(tiny_backbones[name], device="cpu")
            getattr(tiny_models, f"write_tiny_{name}")(tmp_path / name)
