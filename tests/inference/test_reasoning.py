"""The three UALM-Reason loops end to end on the random debug model, with transcripts."""

import json
import os

import soundfile as sf

from megatron_ualm.inference import GenerationParams, SamplingParams
from megatron_ualm.inference import reasoning

PARAMS = GenerationParams(text=SamplingParams(temperature=1.0), audio=SamplingParams(temperature=1.0, top_k=20),
                          max_new_tokens=8, max_audio_seconds=0.2, min_audio_seconds=0.2, seed=0)


def steps(folder):
    with open(os.path.join(folder, "transcript.json")) as f:
        data = json.load(f)
    assert os.path.getsize(os.path.join(folder, "transcript.md")) > 0
    return data["steps"]


def check_audio(folder, entry, frames=10):
    assert entry["frames"] == frames
    data, rate = sf.read(os.path.join(folder, entry["audio"]))
    assert rate == 16000 and len(data) == frames * 320


def test_rich_caption_parts():
    parts = reasoning.split_rich_caption("Keywords: dog, rain. Layout - rain then bark. Description: a small dog")
    assert parts == {"keywords": "dog, rain.", "layout": "rain then bark.", "description": "a small dog"}


def test_enrichment(ualm, tmp_path):
    out = reasoning.enrichment(ualm, "rain on a roof", str(tmp_path), PARAMS)
    names = [s["step"] for s in steps(tmp_path)]
    assert names == ["request", "caption", "audio"]
    check_audio(tmp_path, steps(tmp_path)[2])
    assert out.codes.shape == (8, 10) and len(out.wave) == 3200


def test_dialogue_uses_the_answers(ualm, tmp_path):
    asked = []

    def answer(question):
        asked.append(question)
        return "a big dog"

    out = reasoning.dialogue(ualm, "a dog", answer, str(tmp_path), PARAMS, max_questions=2)
    got = steps(tmp_path)
    names = [s["step"] for s in got]
    assert names[0] == "request" and names[-1] == "audio" and "caption" in names
    # Every question the model asked went to the user, and the answer is in the transcript.
    assert names.count("question") == len(asked) == names.count("answer")
    assert all(s["text"] == "a big dog" for s in got if s["step"] == "answer")
    check_audio(tmp_path, got[-1])
    assert out.codes.shape == (8, 10)


def test_self_reflection_rounds(ualm, tmp_path):
    out = reasoning.self_reflection(ualm, "thunder then a siren", str(tmp_path), rounds=2, params=PARAMS)
    names = [s["step"] for s in steps(tmp_path)]
    assert names == ["request", "caption_0", "audio_0", "listen_1", "critique_1", "audio_1",
                     "listen_2", "critique_2", "audio_2"]
    for entry in steps(tmp_path):
        if entry["step"].startswith("audio"):
            check_audio(tmp_path, entry)
    assert len(out.rounds) == 2 and out.wave is not None
    md = open(os.path.join(tmp_path, "transcript.md")).read()
    assert "critique_2" in md and "02_audio_0.wav" in md
