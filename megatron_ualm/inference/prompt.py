"""Prompts and responses in the UALM sequence format (``megatron_ualm.data.sequence``).

A prompt is the conversation so far laid out by ``build_sample`` plus the opening of the
assistant's reply: ``<|assistant|>`` and, when the caller fixes it, the modality marker. A
response is the stream of columns the generator wrote after that; ``parse_response`` splits it
into text and audio messages (the model switches modality itself with ``<|eot|>``,
``<|assistant|>`` and a marker) and reverts the delay pattern of each audio message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_ualm.codebooks.delay import revert_delay
from megatron_ualm.data.sequence import Message, build_sample
from megatron_ualm.vocab import UALMVocab


@dataclass
class Prompt:
    """One prompt's model inputs.

    Attributes:
        tokens: ``[L]`` stream-0 ids.
        codes: ``[K, L]`` codebook ids (``code_empty`` where none).
        audio_in_features: ``[n, n_mels, window]`` log-mel windows for the ``<|audio_in|>``
            placeholders, in order; None without audio in.
        audio_in_lengths: ``[n]`` valid 25 Hz frames per window.
        modality: the reply's first modality when fixed by the prompt (``text`` / ``audio``),
            None when the model chooses.
    """

    tokens: torch.Tensor
    codes: torch.Tensor
    audio_in_features: Optional[torch.Tensor] = None
    audio_in_lengths: Optional[torch.Tensor] = None
    modality: Optional[str] = None

    def __len__(self) -> int:
        return self.tokens.numel()


def build_prompt(
    messages: Sequence[Message],
    vocab: UALMVocab,
    modality: Optional[str] = None,
    audio_in_features: Optional[torch.Tensor] = None,
    audio_in_lengths: Optional[torch.Tensor] = None,
) -> Prompt:
    """Lays out ``messages`` and opens the assistant's reply.

    Args:
        messages: the conversation so far (``Message`` objects of the sequence format).
        vocab: the token-id layout.
        modality: ``text`` or ``audio`` to fix the reply's first modality; None lets the model
            choose by writing the marker itself.
        audio_in_features: ``[n, n_mels, window]`` windows of every audio-in message, in order.
        audio_in_lengths: ``[n]`` valid frames per window; must sum to the placeholders.

    Returns:
        The prompt.
    """
    if modality is not None:
        vocab.modality(modality)  # validates the name
    sample = build_sample(list(messages), vocab)
    tokens, codes = sample.tokens, sample.codes
    if messages and messages[-1].role == "assistant":
        # The reply continues the assistant's turn: the last message ends with <|eot|>.
        tokens = tokens.clone()
        tokens[-1] = vocab.eot
    suffix = [vocab.role("assistant")] + ([vocab.modality(modality)] if modality else [])
    tokens = torch.cat([tokens, torch.tensor(suffix)])
    codes = torch.cat([codes, torch.full((vocab.num_codebooks, len(suffix)), vocab.code_empty)], dim=1)
    placeholders = int((tokens == vocab.audio_in).sum())
    given = 0 if audio_in_lengths is None else int(audio_in_lengths.sum())
    if placeholders != given:
        raise ValueError(
            f"the messages hold {placeholders} <|audio_in|> frames but audio_in_lengths sums to "
            f"{given}: give one log-mel window per 30 s of each audio-in message "
            "(megatron_ualm.inference.audio_in.audio_in_message builds both)"
        )
    if given and (audio_in_features is None or audio_in_features.shape[0] != audio_in_lengths.shape[0]):
        raise ValueError("audio_in_features must hold one window per audio_in_lengths entry")
    return Prompt(tokens, codes, audio_in_features if given else None, audio_in_lengths if given else None, modality)


def empty_condition_prompt(vocab: UALMVocab, modality: Optional[str] = None) -> Prompt:
    """The unconditional prompt of classifier-free guidance: one user text message with no
    tokens (what ``cfg_condition_dropout`` shows the model in training), then the reply opening.
    """
    return build_prompt([Message("user", "text", text=[])], vocab, modality=modality)


@dataclass
class Segment:
    """One message of a generated reply.

    Attributes:
        modality: ``text`` or ``audio``.
        text: text ids (modality text).
        codes: ``[K, T]`` codec codes, delay pattern reverted (modality audio).
        terminator: ``<|eos|>`` / ``<|eot|>`` that closed it, None when a limit cut it.
    """

    modality: str
    text: list = field(default_factory=list)
    codes: Optional[torch.Tensor] = None
    terminator: Optional[str] = None

    @property
    def num_frames(self) -> int:
        return 0 if self.codes is None else self.codes.shape[1]


def parse_response(tokens: torch.Tensor, codes: torch.Tensor, vocab: UALMVocab, modality: Optional[str]) -> list[Segment]:
    """Splits generated columns into messages.

    Args:
        tokens: ``[S]`` generated stream-0 ids (after the prompt).
        codes: ``[K, S]`` generated codebook ids.
        vocab: the token-id layout.
        modality: the first message's modality when the prompt fixed it, else None.

    Returns:
        The reply's messages, in order.
    """
    K = vocab.num_codebooks
    segments: list[Segment] = []
    current: Optional[Segment] = Segment(modality) if modality else None
    audio_cols: list[int] = []
    markers = {vocab.modality("text"): "text", vocab.modality("audio"): "audio"}

    def close(terminator: Optional[str]) -> None:
        if current.modality == "audio":
            delayed = codes[:, audio_cols]  # [K, S_a]
            frames = max(delayed.shape[1] - K + 1, 0)
            current.codes = revert_delay(delayed[None], frames)[0]  # [K, T]
        current.terminator = terminator
        segments.append(current)

    for j, t in enumerate(tokens.tolist()):
        if t in (vocab.eos, vocab.eot):
            if current is not None:
                close(vocab.token_name(t))
            current, audio_cols = None, []
            if t == vocab.eos:
                return segments
            continue
        if current is None:
            if t in markers:
                current = Segment(markers[t])
            elif t == vocab.role("assistant") or t == vocab.pad:
                continue
            else:
                current = Segment("text", text=[t])
            continue
        if current.modality == "audio":
            if t in vocab.audio_steps:
                audio_cols.append(j)
        elif t != vocab.pad:
            current.text.append(t)
    if current is not None:
        close(None)
    return segments
