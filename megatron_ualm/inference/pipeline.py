"""The Python API of generation: conversations in words and waveforms, replies in words and
waveforms.

Example::

    from megatron_ualm import api
    from megatron_ualm.data.tokenizer import TextTokenizer
    from megatron_ualm.inference import CodecDecoder, GenerationParams, Turn, UALM

    api.initialize_parallel()
    model = api.build_model("qwen2.5-1.5b", bf16=True)   # then load a checkpoint
    ualm = UALM(model, TextTokenizer("qwen_dir"), CodecDecoder.load("xcodec_dir"))
    reply = ualm.respond([[Turn("user", text="a dog barks in the rain")]], modality="audio")[0]
    reply.waves[0]          # float32 samples at reply.sample_rate
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_ualm.data.sequence import Message
from megatron_ualm.inference.audio import AudioListener, CodecDecoder, Upsampler
from megatron_ualm.inference.decoding import Generation, GenerationParams, Generator
from megatron_ualm.inference.prompt import Prompt, build_prompt


@dataclass
class Turn:
    """One message of a conversation, with exactly one content field.

    Args:
        role: ``system`` / ``user`` / ``assistant``.
        text: text content.
        audio: float32 mono waveform the model hears through its encoder (audio in).
        codes: ``[K, T]`` codec codes the model wrote earlier (audio out, in its history).
        sample_rate: rate of ``audio``.
    """

    role: str
    text: Optional[str] = None
    audio: Optional[np.ndarray] = None
    codes: Optional[torch.Tensor] = None
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        n = sum(x is not None for x in (self.text, self.audio, self.codes))
        if n != 1:
            raise ValueError(f"a {self.role} turn needs exactly one of text / audio / codes, got {n}")


@dataclass
class Reply:
    """A decoded reply.

    Attributes:
        texts: the text of each text message, in order.
        codes: ``[K, T]`` codes of each audio message.
        waves: decoded waveforms of each audio message (empty without a codec).
        sample_rate: rate of ``waves`` (after the upsampler, if any).
        parts: the reply in order, ``("text", str)`` or ``("audio", index into codes)``.
        finished: ended by the model rather than a limit.
        generation: the raw ``Generation``.
    """

    texts: list[str]
    codes: list[torch.Tensor]
    waves: list[np.ndarray]
    sample_rate: int
    parts: list = field(default_factory=list)
    finished: bool = True
    generation: Optional[Generation] = None

    @property
    def text(self) -> str:
        """All text messages joined by newlines."""
        return "\n".join(self.texts)


class UALM:
    """A model, its tokenizer and codec, behind ``respond``.

    Args:
        model: this rank's stage of a ``UALMModel`` (any TP / PP; every rank calls the same methods).
        tokenizer: a ``megatron_ualm.data.tokenizer.TextTokenizer`` (or anything with
            ``encode(str) -> list[int]`` and ``decode(ids) -> str``).
        codec: decoder for audio out; None keeps replies as codes only.
        upsampler: optional post-processing of decoded audio (see ``audio.Upsampler``).
    """

    def __init__(self, model, tokenizer, codec: Optional[CodecDecoder] = None, upsampler: Optional[Upsampler] = None):
        self.generator = Generator(model)
        self.vocab = self.generator.vocab
        self.tokenizer = tokenizer
        self.codec = codec
        self.upsampler = upsampler
        self.listener = AudioListener(model.config) if model.config.audio_encoder_type is not None else None

    def prompt(self, conversation: Sequence[Turn], modality: Optional[str] = None) -> Prompt:
        """Lays out a conversation as a prompt (tokenising text, featurising audio in)."""
        messages, feats, lens = [], [], []
        for turn in conversation:
            if turn.text is not None:
                messages.append(Message(turn.role, "text", text=self.tokenizer.encode(turn.text)))
            elif turn.codes is not None:
                messages.append(Message(turn.role, "audio", codes=turn.codes))
            else:
                if self.listener is None:
                    raise ValueError("this model has no audio encoder: it cannot take audio in")
                msg, f, n = self.listener.message(turn.audio, turn.sample_rate, role=turn.role)
                messages.append(msg)
                feats.append(f)
                lens.append(n)
        features = torch.cat(feats) if feats else None
        lengths = torch.cat(lens) if lens else None
        return build_prompt(messages, self.vocab, modality, features, lengths)

    def decode_audio(self, codes: Sequence[torch.Tensor]) -> tuple[list[np.ndarray], int]:
        """Codes -> waveforms (and the upsampler), with their sample rate."""
        if self.codec is None:
            return [], 0
        waves = self.codec.decode(codes)
        rate = self.codec.sample_rate
        if self.upsampler is not None:
            pairs = [self.upsampler(w, rate) for w in waves]
            waves = [w for w, _ in pairs]
            rate = pairs[0][1] if pairs else rate
        return waves, rate

    def respond(
        self,
        conversations: Sequence[Sequence[Turn]],
        params: GenerationParams = GenerationParams(),
        modality: Optional[str] = None,
    ) -> list[Reply]:
        """Generates the assistant's reply to each conversation, as one batch.

        Args:
            conversations: the batch.
            params: decoding settings (CFG applies to audio messages).
            modality: fix the reply's first message to ``text`` or ``audio``; None lets the
                model choose (and switch) by itself.

        Returns:
            One ``Reply`` per conversation.
        """
        prompts = [self.prompt(c, modality) for c in conversations]
        generations = self.generator.generate(prompts, params)
        all_codes = [c for g in generations for c in g.audio]
        waves, rate = self.decode_audio(all_codes)
        replies, w = [], 0
        for g in generations:
            texts, codes, parts, gw = [], [], [], []
            for seg in g.segments:
                if seg.modality == "text":
                    texts.append(self.tokenizer.decode(seg.text))
                    parts.append(("text", texts[-1]))
                else:
                    codes.append(seg.codes)
                    parts.append(("audio", len(codes) - 1))
                    if waves:
                        gw.append(waves[w])
                        w += 1
            replies.append(Reply(texts, codes, gw, rate, parts, g.finished, g))
        return replies
