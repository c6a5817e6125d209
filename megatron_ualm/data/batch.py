"""``UALMBatch``: the tensors of one micro-batch; ``collate`` and ``collate_packed`` build it.

Shapes: ``b`` samples, ``s`` positions, ``K`` codebooks, ``n`` audio-in encoder windows.
Inputs are positions ``[0, s)`` of each row, labels are positions ``[1, s + 1)``.

A row may pack several documents. Each document's position ids restart at 0 and attention
stays inside the document (block-diagonal causal). Padding at the end of a row extends the
row's last document (positions continue, same attention block, no loss), so a row holding a
single document is plain causal attention and needs no mask.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_ualm.data.sequence import UALMSample
from megatron_ualm.vocab import UALMVocab


@dataclass
class UALMBatch:
    """One micro-batch.

    Attributes:
        tokens: ``[b, s]`` stream-0 input ids.
        codes: ``[b, K, s]`` codebook input ids (``code_empty`` where none).
        position_ids: ``[b, s]``, restarting at 0 for each packed document.
        labels: ``[b, s]`` stream-0 targets.
        loss_mask: ``[b, s]`` float, 1 where ``labels`` is trained.
        code_labels: ``[b, K, s]`` codebook targets.
        code_loss_mask: ``[b, K, s]`` float, 1 where ``code_labels`` is trained.
        attention_mask: ``[b, 1, s, s]`` bool, True = masked; None = plain causal.
        audio_in_features: ``[n, n_mels, window]`` log-mel windows for the frozen encoder.
        audio_in_lengths: ``[n]`` valid 25 Hz frames per window; their sum equals the number
            of ``<|audio_in|>`` placeholders in ``tokens``, in order.
        cu_seqlens: ``[num_documents + 1]`` int32 document starts over the flattened
            ``[b * s]`` inputs, for Transformer Engine's packed (``thd``) attention.
        max_seqlen: longest document in ``cu_seqlens``.
    """

    tokens: torch.Tensor
    codes: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    code_labels: torch.Tensor
    code_loss_mask: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    audio_in_features: Optional[torch.Tensor] = None
    audio_in_lengths: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None

    def to(self, device) -> "UALMBatch":
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)
            },
        )

    @property
    def num_audio_in_placeholders(self) -> int:
        return int(self.audio_in_lengths.sum()) if self.audio_in_lengths is not None else 0


@functools.lru_cache(maxsize=4)
def _causal_mask(seq_length: int) -> torch.Tensor:
    """``[s, s]`` bool, True above the diagonal (a future position); shared, never written."""
    return torch.ones(seq_length, seq_length, dtype=torch.bool).triu(1)


def _assemble(
    rows: Sequence[tuple[UALMSample, Sequence[int]]],
    seq_length: int,
    vocab: UALMVocab,
    attention_mask: bool,
) -> UALMBatch:
    """Pads rows of concatenated documents to ``seq_length + 1`` positions and shifts them.

    Args:
        rows: per row, the unshifted sample and the lengths of the documents it packs.
        seq_length: s.
        vocab: pad ids.
        attention_mask: build the block-diagonal mask when some row packs several documents.
    """
    b, K, L = len(rows), vocab.num_codebooks, seq_length + 1
    tokens = torch.full((b, L), vocab.pad, dtype=torch.long)
    codes = torch.full((b, K, L), vocab.code_empty, dtype=torch.long)
    text_target = torch.zeros(b, L, dtype=torch.bool)
    code_target = torch.zeros(b, K, L, dtype=torch.bool)
    position_ids = torch.empty(b, seq_length, dtype=torch.long)
    starts: list[int] = []
    blocks: list[tuple[int, int, int]] = []  # (row, first, end) of every document after a row's first
    for i, (sample, doc_lengths) in enumerate(rows):
        n = len(sample)
        if n > L:
            raise ValueError(f"sample {i} has {n} positions; seq_length + 1 = {L} fit")
        if sum(doc_lengths) != n:
            raise ValueError(f"sample {i}: document lengths {list(doc_lengths)} do not add up to {n}")
        tokens[i, :n] = sample.tokens
        codes[i, :, :n] = sample.codes
        text_target[i, :n] = sample.text_target
        code_target[i, :, :n] = sample.code_target
        begin = 0
        for d, length in enumerate(doc_lengths):
            # The last document absorbs the padding; inputs stop at s.
            end = seq_length if d == len(doc_lengths) - 1 else min(begin + length, seq_length)
            if end > begin:
                position_ids[i, begin:end] = torch.arange(end - begin)
                starts.append(i * seq_length + begin)
                if begin:
                    blocks.append((i, begin, end))
            begin += length
    cu_seqlens = torch.tensor(starts + [b * seq_length], dtype=torch.int32)
    mask = None
    if attention_mask and blocks:
        # Causal, then each later document's rows also mask every column before it: block
        # writes touch at most half the matrix, several times cheaper than comparing ids.
        mask = _causal_mask(seq_length).expand(b, seq_length, seq_length).clone()  # [b, s, s]
        for i, first, end in blocks:
            mask[i, first:end, :first] = True
        mask = mask[:, None]  # [b, 1, s, s]
    return UALMBatch(
        tokens=tokens[:, :-1].contiguous(),
        codes=codes[:, :, :-1].contiguous(),
        position_ids=position_ids,
        labels=tokens[:, 1:].contiguous(),
        loss_mask=text_target[:, 1:].float(),
        code_labels=codes[:, :, 1:].contiguous(),
        code_loss_mask=code_target[:, :, 1:].float(),
        attention_mask=mask,
        cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    )


def collate(
    samples: Sequence[UALMSample],
    seq_length: int,
    vocab: UALMVocab,
    audio_in_features: Optional[torch.Tensor] = None,
    audio_in_lengths: Optional[Sequence[int]] = None,
) -> UALMBatch:
    """Pads (or rejects) single-document samples to ``seq_length + 1`` positions and shifts.

    Args:
        samples: unshifted samples, each at most ``seq_length + 1`` long.
        seq_length: s, the model's input length.
        vocab: the token-id layout (pad ids).
        audio_in_features: ``[n, n_mels, window]`` encoder windows for all audio-in
            placeholders of the samples, in order.
        audio_in_lengths: frames per window; defaults to one window per audio-in message.

    Returns:
        The batch (``attention_mask`` None: plain causal).
    """
    batch = _assemble([(s, [len(s)]) for s in samples], seq_length, vocab, attention_mask=False)
    if audio_in_features is not None:
        frames = [n for s in samples for n in s.audio_in_frames]
        batch.audio_in_features = audio_in_features
        batch.audio_in_lengths = torch.as_tensor(
            list(audio_in_lengths) if audio_in_lengths is not None else frames, dtype=torch.long
        )
    return batch


def collate_packed(
    items: Sequence[dict],
    seq_length: int,
    vocab: UALMVocab,
    attention_mask: bool = True,
) -> UALMBatch:
    """Batches packed samples from ``UALMDataset`` (or ``BlendedDataset`` over it).

    Args:
        items: dicts with ``tokens [L_i]``, ``codes [K, L_i]``, ``text_target``,
            ``code_target``, ``doc_lengths``, ``audio_in_features [n_i, n_mels, window]``,
            ``audio_in_lengths [n_i]`` (``L_i <= seq_length + 1``).
        seq_length: s.
        vocab: pad ids.
        attention_mask: build the ``[b, 1, s, s]`` block-diagonal mask; pass False when the
            model attends with ``cu_seqlens`` (Transformer Engine ``thd``) instead.

    Returns:
        The batch.
    """
    rows = [
        (UALMSample(it["tokens"], it["codes"], it["text_target"], it["code_target"]), it["doc_lengths"].tolist())
        for it in items
    ]
    batch = _assemble(rows, seq_length, vocab, attention_mask)
    lengths = [it["audio_in_lengths"] for it in items if it["audio_in_lengths"].numel()]
    if lengths:
        batch.audio_in_features = torch.cat([it["audio_in_features"] for it in items if it["audio_in_lengths"].numel()])
        batch.audio_in_lengths = torch.cat(lengths)
    return batch
