"""Checks and reports of the training entry points that need no training run: Megatron's bare
asserts in words, shards against the model they train, the plot of a DPO run."""

import argparse
import json

import pytest

from megatron_ualm.config import make_config
from megatron_ualm.data.dataset import check_fits_model
from megatron_ualm.training.loop import MEGATRON_ASSERTIONS, megatron_rejection
from megatron_ualm.vocab import UALMVocab


def _rejection_of(tmp_path, assertion: str, **flags) -> str:
    """What the entry points print for ``assert <assertion>`` failing in a file like Megatron's
    validate_args (compiled apart from this module, so pytest's assertion rewriting leaves it be)."""
    source = tmp_path / "megatron" / "training" / "arguments.py"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(f"def validate(args):\n    assert {assertion}\n")
    scope: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), scope)
    with pytest.raises(AssertionError) as caught:
        scope["validate"](argparse.Namespace(**flags))
    return megatron_rejection(caught.value)


def test_megatron_asserts_users_meet_first_say_what_to_add(tmp_path):
    message = _rejection_of(tmp_path, "args.save_interval is not None", save_interval=None)
    assert message.startswith("--save needs --save-interval N") and "arguments.py:2)" in message
    assert _rejection_of(tmp_path, "not args.bf16", bf16=True).startswith("--fp16 and --bf16 exclude each other")
    # One the table does not know: Megatron's own words (here: the line itself).
    assert _rejection_of(tmp_path, "args.num_dataset_builder_threads > 0", num_dataset_builder_threads=0).startswith(
        "Megatron rejected the arguments: assert args.num_dataset_builder_threads > 0 (")
    assert all(key.count("args.") >= 1 for key in MEGATRON_ASSERTIONS)


def _sidecar(audio_in_seconds: float, storage="pcm16") -> dict:
    return {"family": "chat", "tokenizer": {"vocab_size": 100}, "codec": None, "streams": {"text": "int32", "audio": "int16"},
            "audio_in_storage": storage, "audio_in": {"n_mels": 16, "window_seconds": 2},
            "counts": {"audio_in_seconds": audio_in_seconds}}


def test_an_audio_in_stream_without_clips_fits_a_model_without_encoder():
    vocab = UALMVocab.from_config(make_config("debug", audio_encoder_type=None))
    check_fits_model(_sidecar(0.0), "shards/chat-00000", vocab, None, reads_pairs=False)  # the tools' default stream
    with pytest.raises(ValueError, match=r"shards/chat-00000 holds 3.5 s of audio in, but the model has no audio "
                                         r"encoder"):
        check_fits_model(_sidecar(3.5), "shards/chat-00000", vocab, None, reads_pairs=False)


def test_a_dpo_run_plots_what_dpo_logs(tmp_path):
    from megatron_ualm.training.plot import plot_metrics

    rows = [{"iteration": i, "lr": 1e-6, "loss": 0.69 - 0.01 * i, "dpo loss": 0.69 - 0.01 * i, "sft loss": 2.0,
             "reward accuracy": 0.5, "reward margin": 0.01 * i, "chosen logp": -40.0 + i, "rejected logp": -41.0,
             "chosen text logp": -40.0 + i, "rejected text logp": -41.0, "chosen codebook_0 logp": 0.0,
             "rejected codebook_0 logp": 0.0} for i in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = plot_metrics(str(tmp_path / "metrics.jsonl"), str(tmp_path / "dpo.png"))
    assert {"dpo loss", "reward accuracy", "reward margin", "chosen logp", "rejected text logp"} <= set(drawn)
    assert not any("codebook" in k for k in drawn)  # streams without a supervised cell are left out
    assert (tmp_path / "dpo.png").stat().st_size > 0
