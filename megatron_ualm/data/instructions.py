"""The instructions of the UALM-Reason loops, in one place for the data they train on and the
loops that send them (``inference.reasoning``): a model fine-tuned on ``data.chat`` records sees
at inference exactly the wording it was trained with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningPrompts:
    """The instructions the loops send (system and user messages)."""

    enrichment: str = (
        "Before generating audio, write a rich caption with three parts: Keywords (the "
        "acoustic events), Layout (their temporal order), Description (acoustic detail of "
        "each event). Then generate the audio."
    )
    dialogue: str = (
        "If the request is ambiguous, ask the user one question at a time. When you know "
        "enough, write a rich caption (Keywords, Layout, Description) and generate the audio."
    )
    listen: str = "Describe this audio in detail: the sound events, their order and their character."
    critique: str = (
        "This is what your audio sounds like: {caption}\n"
        "Compare it with your plan. Say what is missing or wrong and how to fix it."
    )
    refine: str = "Generate the refined audio."
    no_answer: str = "No preference, decide yourself."
