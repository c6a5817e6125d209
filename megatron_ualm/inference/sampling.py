"""Token selection from logits: greedy, temperature, top-k, top-p; and classifier-free guidance.

Everything works on a leading batch of independent distributions ``[n, V]``, so the K
codebooks of every row are sampled in one call (``[b * K, card]``), each codebook from its own
distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one stream picks its next id.

    Args:
        temperature: softmax temperature; 0 means greedy (argmax).
        top_k: keep the k most likely ids (0: all).
        top_p: keep the smallest set whose probability reaches p (1.0: all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams(temperature=0.0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sets every logit outside the top-k / nucleus to -inf.

    Args:
        logits: ``[n, V]`` float.
        top_k: keep the k largest (0: no limit).
        top_p: nucleus mass (1.0: no limit); the most likely id is always kept.

    Returns:
        ``[n, V]`` filtered copy.
    """
    out = logits.clone()
    if top_k and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]  # [n, 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop an id when the mass strictly before it already reaches top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Picks one id per row.

    Args:
        logits: ``[n, V]``; -inf marks ids that may not be chosen.
        params: greedy or sampled selection.
        generator: RNG for sampling; every TP rank must pass one seeded the same way.

    Returns:
        ``[n]`` int64 ids.
    """
    logits = logits.float()
    if params.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def guide(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + w * (cond - uncond)``.

    ``w = 1`` gives the conditional logits and ``w = 0`` the unconditional ones, exactly.
    Masked (-inf) entries stay -inf.
    """
    if weight == 1.0:
        return cond
    if weight == 0.0:
        return uncond
    return uncond + weight * (cond - uncond)
