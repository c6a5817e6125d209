"""The UALM-Reason loops over one model: enrichment, dialogue, self-reflection.

- *Enrichment*: vague prompt -> rich caption (Keywords / Layout / Description) in text -> audio.
- *Dialogue*: the model may answer a request with a question; the user's answer (from a
  callback) goes back into the conversation, for up to ``max_questions`` rounds, until the
  model writes the caption and the audio.
- *Self-reflection*: enrichment, then per round: listen to the audio through the
  understanding path (caption it), critique plan vs. result in text, generate refined audio.

Every step lands in a ``Transcript`` (``transcript.json`` + a readable ``transcript.md``, each
audio as a WAV beside them). Instructions are plain text in ``ReasoningPrompts``, so a model
fine-tuned with other wording gets its own.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megatron_ualm.files import atomic_json, atomic_write
from megatron_ualm.data.instructions import ReasoningPrompts
from megatron_ualm.inference.audio import write_wav
from megatron_ualm.inference.decoding import GenerationParams
from megatron_ualm.inference.pipeline import UALM, Reply, Turn


def split_rich_caption(text: str) -> dict:
    """Splits a rich caption into ``keywords`` / ``layout`` / ``description`` (by the part
    names, case-insensitive); parts that are absent map to ``""``."""
    parts = {"keywords": "", "layout": "", "description": ""}
    pattern = re.compile(r"(keywords|layout|description)\s*[:\-]", re.IGNORECASE)
    hits = list(pattern.finditer(text))
    for i, m in enumerate(hits):
        end = hits[i + 1].start() if i + 1 < len(hits) else len(text)
        parts[m.group(1).lower()] = text[m.end():end].strip()
    return parts


class Transcript:
    """Readable record of a loop: each step's role, kind, text and audio file.

    Args:
        directory: where ``transcript.json``, ``transcript.md`` and the WAVs go.
        title: heading of the Markdown file (the user's prompt).
    """

    def __init__(self, directory: str, title: str) -> None:
        self.directory = directory
        self.title = title
        self.steps: list[dict] = []
        os.makedirs(directory, exist_ok=True)

    def add(self, step: str, role: str, text: Optional[str] = None, wave=None, sample_rate: int = 0,
            codes: Optional[torch.Tensor] = None, **extra) -> dict:
        """Records one step; audio is written as ``NN_<step>.wav``."""
        entry = dict(index=len(self.steps), step=step, role=role, **extra)
        if text is not None:
            entry["text"] = text
        if codes is not None:
            entry["frames"] = int(codes.shape[1])
        if wave is not None and sample_rate:
            name = f"{len(self.steps):02d}_{step}.wav"
            write_wav(os.path.join(self.directory, name), wave, sample_rate)
            entry.update(audio=name, seconds=round(len(wave) / sample_rate, 3))
        self.steps.append(entry)
        self.save()
        return entry

    def save(self) -> None:
        atomic_json(os.path.join(self.directory, "transcript.json"), dict(title=self.title, steps=self.steps),
                    indent=2, ensure_ascii=False)
        lines = [f"# {self.title}", ""]
        for e in self.steps:
            lines.append(f"## {e['index']}. {e['step']} ({e['role']})")
            if "text" in e:
                lines += ["", e["text"]]
            if "audio" in e:
                lines += ["", f"audio: [{e['audio']}]({e['audio']}) ({e['seconds']} s)"]
            lines.append("")
        atomic_write(os.path.join(self.directory, "transcript.md"), "\n".join(lines))


@dataclass
class ReasoningResult:
    """Outcome of a loop.

    Attributes:
        caption: the (last) rich caption text, and its parts.
        codes: ``[K, T]`` codes of the final audio.
        wave: the final waveform (None without a codec).
        sample_rate: its rate.
        transcript: the record.
    """

    caption: str
    parts: dict
    codes: Optional[torch.Tensor]
    wave: Optional[object]
    sample_rate: int
    transcript: Transcript
    rounds: list = field(default_factory=list)


def text_params(params: GenerationParams) -> GenerationParams:
    """The settings of a text-only step: it ends at the end of its message and writes no audio."""
    return dataclasses.replace(params, stop_at_eot=True, max_audio_segments=0)


def _audio_of(reply: Reply):
    return (reply.codes[-1], reply.waves[-1] if reply.waves else None) if reply.codes else (None, None)


def _caption_then_audio(ualm: UALM, conversation: list, params: GenerationParams, transcript: Transcript,
                        tag: str = "") -> tuple[str, Reply]:
    """Text caption (forced text reply), then the audio conditioned on it (CFG)."""
    caption = ualm.respond([conversation], text_params(params), modality="text")[0].text
    transcript.add(f"caption{tag}", "assistant", text=caption, parts=split_rich_caption(caption))
    conversation.append(Turn("assistant", text=caption))
    reply = ualm.respond([conversation], params, modality="audio")[0]
    codes, wave = _audio_of(reply)
    transcript.add(f"audio{tag}", "assistant", wave=wave, sample_rate=reply.sample_rate, codes=codes)
    conversation.append(Turn("assistant", codes=codes))
    return caption, reply


def enrichment(ualm: UALM, prompt: str, out_dir: str, params: GenerationParams = GenerationParams(),
               prompts: ReasoningPrompts = ReasoningPrompts()) -> ReasoningResult:
    """Prompt -> rich caption -> audio.

    Args:
        ualm: the model API.
        prompt: the user's request.
        out_dir: transcript folder.
        params: decoding settings (CFG for the audio).
        prompts: the instructions.
    """
    transcript = Transcript(out_dir, prompt)
    transcript.add("request", "user", text=prompt)
    conversation = [Turn("system", text=prompts.enrichment), Turn("user", text=prompt)]
    caption, reply = _caption_then_audio(ualm, conversation, params, transcript)
    codes, wave = _audio_of(reply)
    return ReasoningResult(caption, split_rich_caption(caption), codes, wave, reply.sample_rate, transcript)


def dialogue(ualm: UALM, prompt: str, answer: Callable[[str], Optional[str]], out_dir: str,
             params: GenerationParams = GenerationParams(), max_questions: int = 3,
             prompts: ReasoningPrompts = ReasoningPrompts()) -> ReasoningResult:
    """Multi-turn: the model may ask questions before it writes the caption and the audio.

    Each assistant turn is the model's own choice: a text-only reply is a question to the user
    (``answer(question)`` gives the reply; None means no answer), a reply holding audio ends
    the dialogue. After ``max_questions`` questions the caption and audio are requested.

    Args:
        ualm: the model API.
        prompt: the user's first request.
        answer: the user: question -> answer.
        out_dir: transcript folder.
        params: decoding settings.
        max_questions: questions the model may ask.
        prompts: the instructions.
    """
    transcript = Transcript(out_dir, prompt)
    transcript.add("request", "user", text=prompt)
    conversation = [Turn("system", text=prompts.dialogue), Turn("user", text=prompt)]
    for _ in range(max_questions):
        reply = ualm.respond([conversation], params)[0]
        if reply.codes:
            # The model wrote its caption and the audio in one reply (modality switch).
            caption = reply.text
            transcript.add("caption", "assistant", text=caption, parts=split_rich_caption(caption))
            codes, wave = _audio_of(reply)
            transcript.add("audio", "assistant", wave=wave, sample_rate=reply.sample_rate, codes=codes)
            return ReasoningResult(caption, split_rich_caption(caption), codes, wave, reply.sample_rate, transcript)
        question = reply.text
        transcript.add("question", "assistant", text=question)
        conversation.append(Turn("assistant", text=question))
        user = answer(question)
        user = prompts.no_answer if not user else user
        transcript.add("answer", "user", text=user)
        conversation.append(Turn("user", text=user))
    caption, reply = _caption_then_audio(ualm, conversation, params, transcript)
    codes, wave = _audio_of(reply)
    return ReasoningResult(caption, split_rich_caption(caption), codes, wave, reply.sample_rate, transcript)


def self_reflection(ualm: UALM, prompt: str, out_dir: str, rounds: int = 1,
                    params: GenerationParams = GenerationParams(),
                    prompts: ReasoningPrompts = ReasoningPrompts()) -> ReasoningResult:
    """Enrichment, then ``rounds`` of listen -> critique -> refined audio.

    Listening decodes the audio with the codec and feeds the waveform through the model's own
    encoder (the understanding path), so a codec is required.

    Args:
        ualm: the model API (with a codec).
        prompt: the user's request.
        out_dir: transcript folder.
        rounds: reflection rounds.
        params: decoding settings.
        prompts: the instructions.
    """
    if ualm.codec is None:
        raise ValueError("self-reflection listens to its audio: give the UALM a codec (CodecDecoder)")
    if ualm.upsampler is not None:
        raise ValueError("self-reflection listens at the codec rate: run it without an upsampler")
    transcript = Transcript(out_dir, prompt)
    transcript.add("request", "user", text=prompt)
    conversation = [Turn("system", text=prompts.enrichment), Turn("user", text=prompt)]
    caption, reply = _caption_then_audio(ualm, conversation, params, transcript, tag="_0")
    codes, wave = _audio_of(reply)
    history = []
    for r in range(1, rounds + 1):
        heard = ualm.respond(
            [[Turn("user", audio=wave, sample_rate=reply.sample_rate), Turn("user", text=prompts.listen)]],
            text_params(params), modality="text",
        )[0].text
        transcript.add(f"listen_{r}", "assistant", text=heard)
        conversation.append(Turn("user", text=prompts.critique.format(caption=heard)))
        critique = ualm.respond([conversation], text_params(params), modality="text")[0].text
        transcript.add(f"critique_{r}", "assistant", text=critique)
        conversation.append(Turn("assistant", text=critique))
        reply = ualm.respond([conversation], params, modality="audio")[0]
        codes, wave = _audio_of(reply)
        transcript.add(f"audio_{r}", "assistant", wave=wave, sample_rate=reply.sample_rate, codes=codes)
        conversation.append(Turn("assistant", codes=codes))
        history.append(dict(round=r, listen=heard, critique=critique))
    return ReasoningResult(caption, split_rich_caption(caption), codes, wave, reply.sample_rate, transcript, history)
