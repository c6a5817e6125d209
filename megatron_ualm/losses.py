"""UALM loss: text cross-entropy + weighted per-codebook cross-entropy, reported per codebook."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import torch

from megatron_ualm.config import UALMConfig


def ualm_loss(
    config: UALMConfig,
    loss_mask: torch.Tensor,
    code_loss_mask: torch.Tensor,
    output: Tuple[torch.Tensor, torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """Reduces the model's unreduced cross-entropies under the loss masks.

    The loss is a weighted *sum* over supervised cells, ``text_loss_weight`` per stream-0
    token and ``codebook_loss_weights[k]`` per codebook-k cell; ``num_tokens`` counts the
    cells, so with unit weights ``loss / num_tokens`` is the mean cross-entropy per cell. This
    is Megatron's ``(loss, num_tokens, report)`` contract: with ``calculate_per_token_loss``
    the schedule divides by the tokens of the whole global batch, which weights micro-batches
    with different amounts of audio correctly.

    Args:
        config: supplies the loss weights.
        loss_mask: ``[b, s]``, 1 where the stream-0 label is trained.
        code_loss_mask: ``[b, K, s]``, 1 where the codebook label is trained.
        output: the model's ``(text_loss [b, s], code_loss [b, K, s])``.

    Returns:
        ``(loss, num_tokens, report)``; each report entry is ``[sum, count]`` (Megatron's
        logger divides them): ``lm loss`` (all cells, weighted), ``text loss`` and
        ``codebook_{k} loss`` (unweighted means).
    """
    text_loss, code_loss = output
    loss_mask = loss_mask.to(text_loss.dtype)
    code_loss_mask = code_loss_mask.to(code_loss.dtype)
    text_sum = (text_loss * loss_mask).sum()
    code_sums = (code_loss * code_loss_mask).sum(dim=(0, 2))  # [K]
    text_count = loss_mask.sum()
    code_counts = code_loss_mask.sum(dim=(0, 2))  # [K]
    weights = torch.tensor(config.codebook_loss_weights, dtype=code_sums.dtype, device=code_sums.device)

    loss = config.text_loss_weight * text_sum + (weights * code_sums).sum()
    num_tokens = (text_count + code_counts.sum()).to(torch.int)

    def entry(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return torch.stack([total.detach().float(), count.detach().float()])

    report = {"lm loss": entry(loss, num_tokens), "text loss": entry(text_sum, text_count)}
    for k in range(code_sums.numel()):
        report[f"codebook_{k} loss"] = entry(code_sums[k], code_counts[k])
    return loss, num_tokens, report


def drop_empty_codebook_losses(losses: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drops the ``codebook_{k} loss`` entries that averaged no cell (``0 / 0``).

    A validation split without generation rows (a small shard, a text-only blend) has no codebook
    cells: Megatron divides the summed ``[sum, count]`` entries and prints ``nan``. Such an entry
    is recognised by a NaN next to a finite ``lm loss`` (which sums the codebook cells too, so a
    real NaN in a codebook would make it NaN as well) and left out of the report.
    """
    total = losses.get("lm loss")
    if total is None or not math.isfinite(float(total)):
        return dict(losses)
    return {k: v for k, v in losses.items()
            if not (k.startswith("codebook_") and k.endswith(" loss") and math.isnan(float(v)))}
