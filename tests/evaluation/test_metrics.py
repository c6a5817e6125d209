"""The metric math against the field's implementation (FD) and slow loops of the definitions."""

import math

import numpy as np
import pytest

from megatron_ualm.evaluation import clap_score, frechet_distance, inception_score, kl_divergence
from megatron_ualm.evaluation.metrics import embedding_statistics


def _stats(rng, n, d, shift=0.0):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
    return embedding_statistics(x)


def test_frechet_distance_equals_frechet_audio_distance(monkeypatch):
    """frechet-audio-distance's own calculate_frechet_distance on the same statistics.

    Its code passes ``disp=False`` to scipy's sqrtm, which scipy 1.18 removed; the shim restores
    that call's old contract (return the root and an error estimate) and nothing else.
    """
    import scipy.linalg
    from frechet_audio_distance import fad

    sqrtm = scipy.linalg.sqrtm

    def old_sqrtm(a, disp=True):
        root = sqrtm(a)
        return root if disp else (root, 0.0)

    monkeypatch.setattr(fad.linalg, "sqrtm", old_sqrtm)
    rng = np.random.default_rng(0)
    for d, shift in ((8, 0.0), (32, 0.5), (64, -1.0)):
        mu1, s1 = _stats(rng, 200, d)
        mu2, s2 = _stats(rng, 300, d, shift)
        ref = fad.FrechetAudioDistance.calculate_frechet_distance(None, mu1, s1, mu2, s2)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(float(ref), rel=1e-9, abs=1e-9)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = sum((mu1 - mu2) ** 2) + sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_embedding_statistics_refuses_one_row():
    with pytest.raises(ValueError, match="n >= 2"):
        embedding_statistics(np.zeros((1, 4)))


def _slow_kl(p, q, eps=1e-6):
    out = []
    for row_p, row_q in zip(p, q):
        total = 0.0
        for pi, qi in zip(row_p, row_q):
            if pi > 0:
                total += pi * (math.log(pi) - math.log(qi + eps))
            else:
                total += -pi * math.log(qi + eps)
        out.append(total)
    return out


def test_kl_divergence_matches_the_definition():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(20) * 0.3, size=6)
    q = rng.dirichlet(np.ones(20) * 0.3, size=6)
    p[0, :5] = 0.0  # zero probabilities: 0 log 0 = 0
    p[0] /= p[0].sum()
    got = kl_divergence(p, q)
    np.testing.assert_allclose(got, _slow_kl(p, q), rtol=0, atol=1e-6)
    assert (kl_divergence(p, p) <= 1e-4).all()
    with pytest.raises(ValueError, match="paired rows"):
        kl_divergence(p, q[:3])


def test_kl_divergence_equals_stable_audio_metrics_torch_form():
    """stable-audio-metrics: F.kl_div((ref + 1e-6).log(), gen, reduction='sum') per pair."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(3)
    gen, ref = rng.dirichlet(np.ones(527), size=4), rng.dirichlet(np.ones(527), size=4)
    want = [float(F.kl_div((torch.tensor(r) + 1e-6).log(), torch.tensor(g), reduction="sum")) for g, r in zip(gen, ref)]
    np.testing.assert_allclose(kl_divergence(gen, ref), want, rtol=0, atol=1e-6)


def _slow_inception_score(logits, splits, seed):
    n = len(logits)
    rows = [logits[i] for i in np.random.RandomState(seed).permutation(n)]
    probs = []
    for row in rows:
        m = max(row)
        e = [math.exp(v - m) for v in row]
        s = sum(e)
        probs.append([v / s for v in e])
    scores = []
    for k in range(splits):
        chunk = probs[k * n // splits:(k + 1) * n // splits]
        marginal = [sum(p[c] for p in chunk) / len(chunk) for c in range(len(chunk[0]))]
        kls = [sum(p[c] * (math.log(p[c]) - math.log(marginal[c])) for c in range(len(p))) for p in chunk]
        scores.append(math.exp(sum(kls) / len(kls)))
    mean = sum(scores) / splits
    return mean, math.sqrt(sum((s - mean) ** 2 for s in scores) / splits)


@pytest.mark.parametrize("n,splits", [(40, 10), (23, 4)])
def test_inception_score_matches_the_definition(n, splits):
    logits = np.random.default_rng(4).standard_normal((n, 12)) * 3
    mean, std = inception_score(logits, splits=splits, shuffle_seed=2020)
    want_mean, want_std = _slow_inception_score(logits.tolist(), splits, 2020)
    assert mean == pytest.approx(want_mean, abs=1e-6)
    assert std == pytest.approx(want_std, abs=1e-6)
    # Identical predictions carry no information: IS = 1.
    assert inception_score(np.tile(logits[:1], (n, 1)), splits=splits)[0] == pytest.approx(1.0, abs=1e-9)


def test_clap_score_is_the_cosine_of_each_pair():
    rng = np.random.default_rng(5)
    a, t = rng.standard_normal((5, 16)), rng.standard_normal((5, 16))
    want = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, t)]
    np.testing.assert_allclose(clap_score(a, t), want, atol=1e-12)
    np.testing.assert_allclose(clap_score(a, a), 1.0, atol=1e-12)
