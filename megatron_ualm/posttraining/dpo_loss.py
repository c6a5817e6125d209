"""Direct preference optimisation over text and every codebook, in Megatron's loss contract.

A micro-batch holds ``P`` preference pairs as ``2P`` consecutive rows: row ``2i`` is pair
``i``'s prompt + chosen response, row ``2i + 1`` its prompt + rejected response (both rows of
a pair are always in the same micro-batch, so on the same ranks). The response is what the
rows' loss masks select (the prompt carries no loss).

Log-probability of a response: the model's last stage already returns the unreduced
vocab-parallel cross-entropy of every cell, ``-log p(label)`` (``text_loss [b, s]``,
``code_loss [b, K, s]``; Megatron's ``vocab_parallel_cross_entropy``, so the logits are never
gathered over TP). Summing ``-CE`` under the loss masks gives one sum per stream and row
(stream 0, then codebook k under the delay pattern); the sequence log-probability is their
weighted sum with pretraining's weights (``text_loss_weight``, ``codebook_loss_weights``),
optionally divided by the number of supervised cells (length normalisation)::

    logp(y|x) = w_text * sum_text log p + sum_k w_k * sum_{codebook k} log p     [/ cells]

Sigmoid DPO (Rafailov et al. 2023) with reference log-probabilities ``ref``::

    loss_i = -log sigmoid(beta * [(logp_c - ref_c) - (logp_r - ref_r)])
             + sft_loss_weight * CE(chosen_i)      (weighted CE per supervised cell)

``dpo_loss`` returns Megatron's ``(loss, num_tokens, report)`` with ``num_tokens`` = pairs, so
with ``calculate_per_token_loss`` the schedule divides by the pairs of the global batch: the
step minimises the mean loss per pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.utils import get_attr_wrapped_model

from megatron_ualm.config import UALMConfig


@dataclass(frozen=True)
class DPOConfig:
    """The DPO objective.

    Attributes:
        beta: inverse temperature of the implicit reward ``beta * (logp - ref)`` (> 0).
        sft_loss_weight: weight of the cross-entropy regulariser on the chosen response
            (0 disables it); the term is the weighted cross-entropy per supervised cell.
        length_normalization: divide each sequence log-probability by its supervised cells
            (reference and policy alike) before the DPO difference.
    """

    beta: float = 0.1
    sft_loss_weight: float = 0.0
    length_normalization: bool = False

    def __post_init__(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"DPO beta={self.beta} must be a finite number > 0 (the paper uses 0.1)")
        if not (self.sft_loss_weight >= 0 and math.isfinite(self.sft_loss_weight)):
            raise ValueError(f"sft_loss_weight={self.sft_loss_weight} must be a finite number >= 0")


@dataclass
class StreamLogps:
    """Log-probability sums of each row's supervised cells, per stream.

    Attributes:
        sums: ``[b, 1 + K]`` float32: column 0 stream 0 (text and audio-step tokens), column
            ``1 + k`` codebook k.
        counts: ``[b, 1 + K]`` float32 supervised cells behind each sum.
    """

    sums: torch.Tensor
    counts: torch.Tensor


def stream_logps(
    output: Tuple[torch.Tensor, torch.Tensor], loss_mask: torch.Tensor, code_loss_mask: torch.Tensor
) -> StreamLogps:
    """Per-row, per-stream log-probability sums from the model's unreduced cross-entropies.

    Args:
        output: the last stage's ``(text_loss [b, s], code_loss [b, K, s])``, ``-log p`` of
            each label.
        loss_mask: ``[b, s]``, 1 where the stream-0 label is supervised.
        code_loss_mask: ``[b, K, s]``, 1 where the codebook label is supervised.

    Returns:
        The sums and cell counts, ``[b, 1 + K]`` each, in float32.
    """
    text_loss, code_loss = output
    mask = loss_mask.float()
    code_mask = code_loss_mask.float()
    text = -(text_loss.float() * mask).sum(dim=-1, keepdim=True)  # [b, 1]
    codes = -(code_loss.float() * code_mask).sum(dim=-1)  # [b, K]
    counts = torch.cat([mask.sum(dim=-1, keepdim=True), code_mask.sum(dim=-1)], dim=1)  # [b, 1 + K]
    return StreamLogps(torch.cat([text, codes], dim=1), counts)


def stream_weights(config: UALMConfig, device=None) -> torch.Tensor:
    """``[1 + K]`` pretraining loss weights: stream 0, then each codebook."""
    return torch.tensor((config.text_loss_weight, *config.codebook_loss_weights), dtype=torch.float32, device=device)


def sequence_logp(sums: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Weighted sequence log-probability ``[b]`` from per-stream sums ``[b, 1 + K]``.

    With ``normalize`` the weighted sum is divided by the row's supervised cells (a row with
    none gives 0).
    """
    total = (sums * weights).sum(dim=-1)  # [b]
    if normalize:
        total = total / counts.sum(dim=-1).clamp(min=1.0)
    return total


def _entry(total: torch.Tensor, count) -> torch.Tensor:
    """A ``[sum, count]`` report entry (Megatron's logger divides them over the global batch)."""
    return torch.stack([total.detach().float().reshape(()), torch.as_tensor(count, dtype=torch.float32, device=total.device)])


def dpo_loss(
    config: UALMConfig,
    dpo: DPOConfig,
    loss_mask: torch.Tensor,
    code_loss_mask: torch.Tensor,
    reference: torch.Tensor,
    output: Tuple[torch.Tensor, torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """DPO loss of a micro-batch of pairs, in Megatron's ``(loss, num_tokens, report)`` form.

    Args:
        config: supplies the per-stream weights.
        dpo: beta, regulariser weight, length normalisation.
        loss_mask: ``[2P, s]`` stream-0 loss mask of the rows (chosen, rejected, ...).
        code_loss_mask: ``[2P, K, s]`` codebook loss mask.
        reference: ``[P, 2, 1 + K]`` reference log-probability sums per stream of each pair's
            chosen (index 0) and rejected (index 1) response (no gradient).
        output: the model's ``(text_loss [2P, s], code_loss [2P, K, s])``.

    Returns:
        ``loss`` (sum over pairs), ``num_tokens`` (the pairs, int) and the report, each entry
        ``[sum over pairs, pairs]``: ``loss``, ``dpo loss``, ``sft loss`` (CE per chosen
        cell), ``reward accuracy`` (share of pairs with a positive margin), ``reward margin``
        (``beta * [(logp_c - ref_c) - (logp_r - ref_r)]``), ``chosen logp`` / ``rejected logp``
        (the sequence log-probabilities the loss uses) and their per-stream sums ``chosen text
        logp``, ``chosen codebook_{k} logp``, ``rejected ...`` (0 for a response without audio).
    """
    rows = loss_mask.shape[0]
    if rows % 2:
        raise ValueError(f"a DPO micro-batch holds (chosen, rejected) row pairs; got {rows} rows")
    P, K = rows // 2, code_loss_mask.shape[1]
    if tuple(reference.shape) != (P, 2, 1 + K):
        raise ValueError(f"reference log-probs must be [pairs={P}, 2, 1 + K={1 + K}], got {tuple(reference.shape)}")
    policy = stream_logps(output, loss_mask, code_loss_mask)
    weights = stream_weights(config, policy.sums.device)
    normalize = dpo.length_normalization
    logp = sequence_logp(policy.sums, policy.counts, weights, normalize).view(P, 2)
    ref = sequence_logp(reference.reshape(rows, 1 + K).to(policy.sums), policy.counts, weights, normalize).view(P, 2)
    margin = dpo.beta * ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1]))  # [P]
    per_pair_dpo = -F.logsigmoid(margin)

    chosen_cells = policy.counts[0::2].sum(dim=-1).clamp(min=1.0)  # [P]
    sft = -(policy.sums[0::2] * weights).sum(dim=-1) / chosen_cells  # [P], CE per chosen cell
    loss = per_pair_dpo.sum()
    if dpo.sft_loss_weight:
        loss = loss + dpo.sft_loss_weight * sft.sum()

    report = {
        "loss": _entry(loss, P),
        "dpo loss": _entry(per_pair_dpo.sum(), P),
        "sft loss": _entry(sft.sum(), P),
        "reward accuracy": _entry((margin > 0).float().sum(), P),
        "reward margin": _entry(margin.sum(), P),
    }
    for side, rows_of_side in (("chosen", slice(0, None, 2)), ("rejected", slice(1, None, 2))):
        sums = policy.sums[rows_of_side]  # [P, 1 + K]
        report[f"{side} logp"] = _entry(logp[:, 0 if side == "chosen" else 1].sum(), P)
        report[f"{side} text logp"] = _entry(sums[:, 0].sum(), P)
        for k in range(K):
            report[f"{side} codebook_{k} logp"] = _entry(sums[:, 1 + k].sum(), P)
    return loss, torch.tensor(P, dtype=torch.int, device=loss.device), report


def _device():
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def dpo_forward_step(dpo: DPOConfig, data_iterator, model):
    """Megatron ``forward_step_func`` for DPO (bind ``dpo`` with ``functools.partial``).

    ``data_iterator`` yields ``PairBatch`` objects whose ``reference`` is set on the last
    pipeline stage (other stages never compute the loss).
    """
    from megatron_ualm.api import model_inputs

    batch = next(data_iterator).to(_device())
    config = get_attr_wrapped_model(model, "config")
    output = model(**model_inputs(batch.rows, config))
    reference = batch.reference
    if reference is None:
        if get_attr_wrapped_model(model, "post_process"):
            raise RuntimeError("a DPO micro-batch reached the loss without reference log-probs; attach them with a "
                               "posttraining.reference.ReferenceSource (python -m megatron_ualm.dpo does, through the "
                               "ReferenceLogProbs training extension)")
        # Only the last stage reads the reference; elsewhere the loss function is never called.
        reference = torch.full((batch.num_pairs, 2, 1 + config.num_codebooks), float("nan"))
    return output, partial(dpo_loss, config, dpo, batch.rows.loss_mask, batch.rows.code_loss_mask, reference)


def _scores(loss_mask: torch.Tensor, code_loss_mask: torch.Tensor, output) -> tuple:
    """Loss function of the scoring pass: no loss, the per-stream sums as the 'report'."""
    sums = stream_logps(output, loss_mask, code_loss_mask).sums.detach()
    zero = sums.new_zeros(())
    return zero, torch.tensor(0, dtype=torch.int), {"stream logps": sums}


def scoring_forward_step(data_iterator, model):
    """Megatron ``forward_step_func`` of a forward-only pass that scores rows.

    Yields per micro-batch (last stage) ``{"stream logps": [b, 1 + K]}``; ``data_iterator``
    yields ``PairBatch`` (or ``UALMBatch``) objects.
    """
    from megatron_ualm.api import model_inputs

    batch = next(data_iterator).to(_device())
    rows = getattr(batch, "rows", batch)
    config = get_attr_wrapped_model(model, "config")
    output = model(**model_inputs(rows, config))
    return output, partial(_scores, rows.loss_mask, rows.code_loss_mask)


def score_batches(model_chunks, batches, seq_length: int) -> Optional[list]:
    """Per-stream log-probability sums of every row of ``batches``, forward only.

    Runs Megatron's schedule (any TP / PP) with gradients off; every rank of the model-parallel
    group must call it with the same batches.

    Args:
        model_chunks: this rank's model chunk(s) (a module or a list of modules).
        batches: the micro-batches (``PairBatch`` or ``UALMBatch``), all with the same rows.
        seq_length: s of the batches.

    Returns:
        On the last pipeline stage, one ``[rows, 1 + K]`` float32 tensor per batch; None
        elsewhere.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return [] if parallel_state.is_pipeline_last_stage() else None
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    rows = getattr(batches[0], "rows", batches[0]).tokens.shape[0]
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            reports = get_forward_backward_func()(
                forward_step_func=scoring_forward_step,
                data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(batches),
                seq_length=seq_length,
                micro_batch_size=rows,
                forward_only=True,
            )
    finally:
        for c, mode in zip(chunks, was_training):
            c.train(mode)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return [r["stream logps"].cpu() for r in reports]
