"""Record reasons name the field at fault: empty audio, an end past the clip, the audio placement rule."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from megatron_ualm.data.audio import AudioInConfig, dali_available, load_audio
from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.records import UnderstandingConverter

DECODERS = ["soundfile"] + (["dali"] if dali_available() else [])


def reason(call) -> RecordError:
    with pytest.raises(RecordError) as err:
        call()
    return err.value


@pytest.mark.parametrize("decoder", DECODERS)
def test_empty_audio_is_empty_audio(tmp_path, decoder):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)  # a valid WAV header, no samples
    (tmp_path / "zero.wav").write_bytes(b"")
    for source in (str(tmp_path / "empty.wav"), str(tmp_path / "zero.wav"), b""):
        err = reason(lambda: load_audio(source, 16000, field="sound", decoder=decoder))
        assert err.field == "sound" and err.reason.startswith("empty audio"), err
    err = reason(lambda: load_audio(str(tmp_path / "empty.wav"), 16000, start=0.5, decoder=decoder))
    assert err.field == "audio" and err.reason.startswith("empty audio"), err  # not a time-span error


@pytest.mark.parametrize("decoder", DECODERS)
def test_end_past_the_clip_is_reported_with_its_length(audio_dir, decoder):
    wav0 = os.path.join(audio_dir, "wav0.wav")  # 0.5 s
    err = reason(lambda: load_audio(wav0, 16000, start=0.1, end=0.9, decoder=decoder))
    assert err.field == "end" and "past the end" in err.reason and "0.500 s long" in err.reason, err
    err = reason(lambda: load_audio(wav0, 16000, start=0.6, decoder=decoder))
    assert err.field == "start" and "0.500 s long" in err.reason, err
    # Timestamps rounded to 10 ms are accepted: the clip ends where the file ends.
    assert load_audio(wav0, 16000, start=0.1, end=0.505, decoder=decoder).shape[0] == 6400
    assert load_audio(wav0, 16000, start=0.1, end=0.5, decoder=decoder).shape[0] == 6400


def test_conversation_without_marker_puts_the_clip_before_the_first_user_turn(tokenizer_path, audio_dir):
    convert = UnderstandingConverter(tokenizer_path, AudioInConfig(16, 2), audio_root=audio_dir)
    segments = convert.convert({"sound": "wav0.wav", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "what is it"},
        {"role": "assistant", "content": "a tone"}, {"role": "user", "content": "how long"}]})
    assert [(s.role, s.kind) for s in segments] == [("system", "text"), ("user", "audio_in"), ("user", "text"),
                                                   ("assistant", "text"), ("user", "text")]
