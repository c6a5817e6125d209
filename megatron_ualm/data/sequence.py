"""The UALM sequence format: messages -> stream-0 tokens + K codebook streams + targets.

A sample is ``<|bos|>`` followed, for each message, by ::

    <|role|> <|modality|> content <|eos|>      (<|eot|> when the next message has the same role)

Content by kind:
- text: the tokenizer's ids.
- audio in (understanding): one ``<|audio_in|>`` placeholder per 25 Hz encoder frame; the
  model replaces their embeddings with the adapter's output.
- audio out (generation): the delayed codes ``[K, T + K - 1]`` in streams 1..K; stream 0
  holds ``<|audio_out|>`` at the T steps that start a frame and ``<|audio_flush|>`` at the
  K - 1 steps after the last frame. The text head therefore says when the audio ends: at the
  last frame step it predicts ``<|audio_flush|>`` (at that point codebook 0 stops), and after
  the flush it predicts the terminator.

Targets (what the loss trains) are the modality marker, content and terminator of messages
with ``loss=True`` (by default: assistant messages). Codebook targets are the valid
(non-empty) cells of audio-out content in those messages. Position j of a sample is
predicted from positions < j; ``collate`` does the shift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_ualm.codebooks.delay import apply_delay
from megatron_ualm.vocab import UALMVocab


@dataclass
class Message:
    """One turn of a conversation.

    Exactly one content field is set: ``text`` (token ids) for modality text; for modality
    audio either ``codes`` (``[K, T]`` codec codes, audio out) or ``audio_in_frames`` (number
    of 25 Hz encoder frames, audio in).
    """

    role: str
    modality: str
    text: Optional[Sequence[int]] = None
    codes: Optional[torch.Tensor] = None
    audio_in_frames: Optional[int] = None
    loss: Optional[bool] = None
    """Train on this message's content; None means: only for the assistant."""

    def __post_init__(self) -> None:
        set_fields = [n for n in ("text", "codes", "audio_in_frames") if getattr(self, n) is not None]
        if len(set_fields) != 1:
            raise ValueError(
                f"a {self.role} message needs exactly one of text / codes / audio_in_frames, "
                f"got {set_fields or 'none'}"
            )
        expected = "text" if self.text is not None else "audio"
        if self.modality != expected:
            raise ValueError(
                f"a {self.role} message with {set_fields[0]} must have modality {expected!r}, "
                f"got {self.modality!r}"
            )
        if self.loss is None:
            self.loss = self.role == "assistant"


@dataclass
class UALMSample:
    """One unshifted sample of length L.

    Attributes:
        tokens: ``[L]`` stream-0 ids.
        codes: ``[K, L]`` codebook ids (``vocab.code_empty`` where no code).
        text_target: ``[L]`` bool, stream-0 id at j is a training target.
        code_target: ``[K, L]`` bool, codebook cell (k, j) is a training target.
        audio_in_frames: 25 Hz frame count of each audio-in message, in order.
    """

    tokens: torch.Tensor
    codes: torch.Tensor
    text_target: torch.Tensor
    code_target: torch.Tensor
    audio_in_frames: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens.numel()


def build_sample(messages: Sequence[Message], vocab: UALMVocab) -> UALMSample:
    """Lays out a conversation in the UALM sequence format.

    Args:
        messages: the turns, in order.
        vocab: the token-id layout.

    Returns:
        The unshifted sample.
    """
    K = vocab.num_codebooks
    tokens: list[torch.Tensor] = [torch.tensor([vocab.bos])]
    codes: list[torch.Tensor] = [torch.full((K, 1), vocab.code_empty)]
    text_target: list[torch.Tensor] = [torch.zeros(1, dtype=torch.bool)]
    code_target: list[torch.Tensor] = [torch.zeros(K, 1, dtype=torch.bool)]
    audio_in_frames: list[int] = []

    def emit(ids: torch.Tensor, train: bool, cells: Optional[torch.Tensor] = None) -> None:
        n = ids.numel()
        tokens.append(ids)
        text_target.append(torch.full((n,), train))
        if cells is None:
            codes.append(torch.full((K, n), vocab.code_empty))
            code_target.append(torch.zeros(K, n, dtype=torch.bool))
        else:
            codes.append(cells)
            code_target.append((cells != vocab.code_empty) & train)

    for i, msg in enumerate(messages):
        train = bool(msg.loss)
        emit(torch.tensor([vocab.role(msg.role)]), False)
        emit(torch.tensor([vocab.modality(msg.modality)]), train)
        if msg.text is not None:
            ids = torch.as_tensor(list(msg.text), dtype=torch.long)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab.text_vocab_size):
                raise ValueError(
                    f"message {i} ({msg.role}): text ids must lie in [0, {vocab.text_vocab_size}),"
                    f" got range [{int(ids.min())}, {int(ids.max())}]"
                )
            emit(ids, train)
        elif msg.codes is not None:
            c = torch.as_tensor(msg.codes, dtype=torch.long)
            if c.dim() != 2 or c.shape[0] != K:
                raise ValueError(f"message {i} ({msg.role}): codes must be [K={K}, T], got {tuple(c.shape)}")
            if c.numel() and (int(c.min()) < 0 or int(c.max()) >= vocab.codebook_size):
                raise ValueError(
                    f"message {i} ({msg.role}): codes must lie in [0, {vocab.codebook_size}), "
                    f"got range [{int(c.min())}, {int(c.max())}]"
                )
            delayed = apply_delay(c[None], vocab.code_empty)[0]  # [K, T + K - 1]
            steps = torch.full((delayed.shape[1],), vocab.audio_flush)
            steps[: c.shape[1]] = vocab.audio_out
            emit(steps, train, delayed)
        else:
            n = int(msg.audio_in_frames)
            if n <= 0:
                raise ValueError(f"message {i} ({msg.role}): audio_in_frames must be > 0, got {n}")
            audio_in_frames.append(n)
            # Input audio is never a target: the placeholders are replaced by features.
            emit(torch.full((n,), vocab.audio_in), False)
        same_role_next = i + 1 < len(messages) and messages[i + 1].role == msg.role
        emit(torch.tensor([vocab.eot if same_role_next else vocab.eos]), train)

    return UALMSample(
        tokens=torch.cat(tokens),
        codes=torch.cat(codes, dim=1),
        text_target=torch.cat(text_target),
        code_target=torch.cat(code_target, dim=1),
        audio_in_frames=audio_in_frames,
    )
