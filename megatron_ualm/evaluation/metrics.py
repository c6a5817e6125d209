"""The math of the text-to-audio metrics, on arrays (no model code).

Each function follows the implementation the field reports with, so numbers compare:

- ``frechet_distance``: pytorch-fid / frechet-audio-distance / stable-audio-metrics (scipy
  ``sqrtm`` of the covariance product, an ``eps`` ridge when its root is not finite).
- ``kl_divergence``: stable-audio-metrics' PaSST KL, ``F.kl_div((q + 1e-6).log(), p, 'sum')``
  per pair, i.e. KL(p || q) with p = generated, q = reference class posteriors.
- ``inception_score``: audioldm_eval's ``calculate_isc`` (softmax over classifier logits,
  rows shuffled with a fixed seed, 10 splits, mean and std of exp(E[KL(p(y|x) || p(y))])).
- ``clap_score``: cosine similarity of a clip's CLAP audio embedding with its prompt's text
  embedding (stable-audio-metrics / LAION-CLAP).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def embedding_statistics(embeddings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a set of embeddings.

    Args:
        embeddings: ``[n, d]`` (n >= 2), e.g. every OpenL3 frame of every clip.

    Returns:
        ``(mu [d], sigma [d, d])`` float64 (sigma is the unbiased covariance, as ``np.cov``).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embedding statistics need [n >= 2, d] embeddings, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``.

    Args:
        mu1, sigma1: ``[d]``, ``[d, d]`` statistics of one set (e.g. generated clips).
        mu2, sigma2: the other set's (e.g. the reference set).
        eps: ridge added to both diagonals when the product's square root is not finite.

    Returns:
        The distance (as the field reports it: the squared form ``d^2``).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    # scipy >= 1.18 dropped sqrtm's ``disp`` flag (the reference implementations pass disp=False);
    # without it every scipy version returns the root itself.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrt(sigma1 sigma2) has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (``[n, C]`` -> ``[n, C]``)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Per-row KL(p || q) = sum_c p_c (log p_c - log(q_c + eps)), with 0 log 0 = 0.

    Args:
        p: ``[n, C]`` probabilities (generated clips' class posteriors).
        q: ``[n, C]`` probabilities of the paired rows (the reference clips of the same prompts).
        eps: added to q before the log, as stable-audio-metrics does.

    Returns:
        ``[n]`` float64 divergences (the metric is their mean).
    """
    p, q = np.atleast_2d(np.asarray(p, np.float64)), np.atleast_2d(np.asarray(q, np.float64))
    if p.shape != q.shape:
        raise ValueError(f"KL needs paired rows of equal shape, got {p.shape} and {q.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return (p_log_p - p * np.log(q + eps)).sum(axis=-1)


def inception_score(logits: np.ndarray, splits: int = 10, shuffle_seed: int | None = 2020) -> Tuple[float, float]:
    """Inception score of classifier logits.

    Args:
        logits: ``[n, C]`` pre-softmax classifier outputs (PANNs' ``fc_audioset``).
        splits: the rows are cut into this many chunks; the score is computed per chunk.
        shuffle_seed: rows are permuted with ``np.random.RandomState(seed)`` first (None: no
            shuffle), as audioldm_eval does.

    Returns:
        ``(mean, std)`` over the chunks.
    """
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < splits:
        raise ValueError(f"inception score needs [n >= splits={splits}, C] logits, got shape {x.shape}")
    n = x.shape[0]
    if shuffle_seed is not None:
        x = x[np.random.RandomState(shuffle_seed).permutation(n)]
    p = softmax(x)
    log_p = x - x.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for i in range(splits):
        chunk, log_chunk = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        marginal = chunk.mean(axis=0, keepdims=True)
        scores.append(float(np.exp((chunk * (log_chunk - np.log(marginal))).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def clap_score(audio_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Per-pair cosine similarity of CLAP audio and text embeddings.

    Args:
        audio_embeddings: ``[n, d]``.
        text_embeddings: ``[n, d]`` (row i is the prompt of clip i).

    Returns:
        ``[n]`` float64 in [-1, 1] (the metric is their mean).
    """
    a = np.atleast_2d(np.asarray(audio_embeddings, np.float64))
    t = np.atleast_2d(np.asarray(text_embeddings, np.float64))
    if a.shape != t.shape:
        raise ValueError(f"CLAP score needs paired embeddings of equal shape, got {a.shape} and {t.shape}")
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(t, axis=1), 1e-8)
    return (a * t).sum(axis=1) / norms
