"""``UALMBatch``: the tensors of one micro-batch, and ``collate`` from samples.

Shapes: ``b`` samples, ``s`` positions, ``K`` codebooks, ``n`` audio-in encoder windows.
Inputs are positions ``[0, s)`` of each sample, labels are positions ``[1, s + 1)``.
"""

from __future__ import annotations

import dataclasses
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
        position_ids: ``[b, s]``.
        labels: ``[b, s]`` stream-0 targets.
        loss_mask: ``[b, s]`` float, 1 where ``labels`` is trained.
        code_labels: ``[b, K, s]`` codebook targets.
        code_loss_mask: ``[b, K, s]`` float, 1 where ``code_labels`` is trained.
        attention_mask: ``[b, 1, s, s]`` bool, True = masked; None = plain causal.
        audio_in_features: ``[n, n_mels, window]`` log-mel windows for the frozen encoder.
        audio_in_lengths: ``[n]`` valid 25 Hz frames per window; their sum equals the number
            of ``<|audio_in|>`` placeholders in ``tokens``, in order.
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


def collate(
    samples: Sequence[UALMSample],
    seq_length: int,
    vocab: UALMVocab,
    audio_in_features: Optional[torch.Tensor] = None,
    audio_in_lengths: Optional[Sequence[int]] = None,
) -> UALMBatch:
    """Pads (or rejects) samples to ``seq_length + 1`` positions and shifts into a batch.

    Args:
        samples: unshifted samples, each at most ``seq_length + 1`` long.
        seq_length: s, the model's input length.
        vocab: the token-id layout (pad ids).
        audio_in_features: ``[n, n_mels, window]`` encoder windows for all audio-in
            placeholders of the samples, in order.
        audio_in_lengths: frames per window; defaults to one window per audio-in message.

    Returns:
        The batch.
    """
    b, K, L = len(samples), vocab.num_codebooks, seq_length + 1
    tokens = torch.full((b, L), vocab.pad, dtype=torch.long)
    codes = torch.full((b, K, L), vocab.code_empty, dtype=torch.long)
    text_target = torch.zeros(b, L, dtype=torch.bool)
    code_target = torch.zeros(b, K, L, dtype=torch.bool)
    frames: list[int] = []
    for i, sample in enumerate(samples):
        n = len(sample)
        if n > L:
            raise ValueError(f"sample {i} has {n} positions; seq_length + 1 = {L} fit")
        tokens[i, :n] = sample.tokens
        codes[i, :, :n] = sample.codes
        text_target[i, :n] = sample.text_target
        code_target[i, :, :n] = sample.code_target
        frames.extend(sample.audio_in_frames)
    lengths = None
    if audio_in_features is not None:
        lengths = torch.as_tensor(
            list(audio_in_lengths) if audio_in_lengths is not None else frames, dtype=torch.long
        )
    return UALMBatch(
        tokens=tokens[:, :-1].contiguous(),
        codes=codes[:, :, :-1].contiguous(),
        position_ids=torch.arange(seq_length).expand(b, seq_length).contiguous(),
        labels=tokens[:, 1:].contiguous(),
        loss_mask=text_target[:, 1:].float(),
        code_labels=codes[:, :, 1:].contiguous(),
        code_loss_mask=code_target[:, :, 1:].float(),
        audio_in_features=audio_in_features,
        audio_in_lengths=lengths,
    )
