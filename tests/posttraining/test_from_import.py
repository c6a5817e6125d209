"""Post-training from a plain ``--flavor hf`` import, as a new user meets it (issue 20).

A tiny Qwen2 whose shapes are no flavor's (ffn 160, 200 text ids, no audio encoder) is imported;
SFT and DPO start from it without ``--flavor`` on shards the data tools wrote with their defaults
(an audio-in stream without a single clip). Mistakes made on the way end in one line before
anything is built, and the console holds what a person acts on.
"""

import json
import os
import random
import subprocess
import sys

import pytest

from ualm_testing import child_env, run_ok

pytestmark = pytest.mark.slow  # an import, SFT and DPO runs, the data tools: about a minute on 2 cores

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "64", "--eval-iters", "0",
         "--log-interval", "1", "--train-iters", "3", "--save-interval", "3"]


def _module(module, *args, ok=True):
    cmd = [sys.executable, "-m", module, *args]
    if ok:
        return run_ok(cmd, timeout=600)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env())


def _tool(name, *args):
    return run_ok([sys.executable, os.path.join(ROOT, "tools", f"{name}.py"), *args], timeout=600)


def _one_line(proc, *needles):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("hf_import")
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=160, vocab_size=256, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, max_position_embeddings=512)
    Qwen2ForCausalLM(config).save_pretrained(root / "llm")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(200)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "llm" / "tokenizer.json"))
    _tool("convert_checkpoint", "import", "--hf-dir", str(root / "llm"), "--output", str(root / "ualm"),
          "--flavor", "hf", "--no-audio-encoder", "--no-progress")

    rng = random.Random(0)

    def words(n):
        return " ".join(f"w{rng.randrange(1, 200)}" for _ in range(n))

    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": words(5)}, {"role": "assistant", "content": words(6)}]}) + "\n" for _ in range(40)))
    (root / "pairs.jsonl").write_text("".join(json.dumps(
        {"prompt": words(4), "chosen": words(5), "rejected": words(5)}) + "\n" for _ in range(40)))
    tok_dir = str(root / "llm")
    for tool, manifest, out in (("preprocess_chat", "chat.jsonl", "chat"), ("preprocess_preferences", "pairs.jsonl",
                                                                             "pairs")):
        _tool(tool, "--input", str(root / manifest), "--output", str(root / "shards" / out), "--tokenizer", tok_dir,
              "--no-progress")  # the tools' defaults: an audio-in stream (pcm16), no clip in it
        _tool("build_blend", str(root / "shards" / out), "--output", str(root / f"{out}_blend.json"))
    return root


def test_sft_then_dpo_start_from_the_import_without_flavor(imported, tmp_path):
    from megatron_ualm.checkpoint_format import read_description

    root = imported
    sft = str(tmp_path / "sft")
    log = _module("megatron_ualm.finetune", "--pretrained-checkpoint", str(root / "ualm"), "--load", sft, "--save", sft,
                  "--blend-file", str(root / "chat_blend.json"), "--lr", "1e-4", *TRAIN)
    described = read_description(sft)
    assert described["flavor"] == "hf" and described["arch"]["ffn_hidden_size"] == 160
    assert described["arch"]["text_vocab_size"] == 200 and described["arch"]["audio_encoder_type"] is None
    # The console: Megatron's argument dump in a file, its memory report once, no INFO logs.
    assert "------------------------ arguments" not in log and "hidden_size ....." not in log
    assert os.path.isfile(os.path.join(sft, "megatron_arguments.txt"))
    assert "hidden_size ...." in open(os.path.join(sft, "megatron_arguments.txt")).read()
    assert log.count("Theoretical memory footprints") == 1, log[-4000:]
    assert "INFO:" not in log and "one_logger" not in log and "Could not determine rank" not in log

    dpo = str(tmp_path / "dpo")
    log = _module("megatron_ualm.dpo", "--pretrained-checkpoint", sft, "--load", dpo, "--save", dpo,
                  "--blend-file", str(root / "pairs_blend.json"), "--lr", "1e-6", "--tensorboard-dir",
                  str(tmp_path / "tb"), *TRAIN, "--eval-iters", "2")
    assert " [DPO] iteration        3" in log and log.count("Theoretical memory footprints") == 1
    dpo_line = next(line for line in log.splitlines() if " [DPO] iteration        3" in line)
    assert "chosen text logp" in dpo_line and "codebook_" not in dpo_line, dpo_line  # text-only pairs
    assert dpo_line.endswith("codebook logps of 0 left out (no audio tokens)"), dpo_line
    validation = next(line for line in log.splitlines() if "validation loss at iteration 3 on validation set" in line)
    assert "chosen text logp value" in validation and "codebook_" not in validation, validation
    assert "Evaluating on 4 samples (2 iterations)" in log and "Evaluating iter" not in log
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    out = run_ok([sys.executable, os.path.join(ROOT, "tools", "plot_losses.py"), os.path.join(dpo, "metrics.jsonl"),
                  str(tmp_path / "dpo.png")])
    assert "reward accuracy" in out and "chosen logp" in out and "codebook" not in out  # text-only pairs


def test_mistakes_end_in_one_line_before_anything_is_built(imported, tmp_path):
    root = imported
    common = ["--load", str(tmp_path / "run"), "--save", str(tmp_path / "run"), "--blend-file",
              str(root / "chat_blend.json"), "--lr", "1e-4"]
    _one_line(_module("megatron_ualm.finetune", "--pretrained-checkpoint", str(tmp_path / "nowhere"), *common, *TRAIN,
                      ok=False), "--pretrained-checkpoint", "does not exist")
    no_interval = TRAIN[:TRAIN.index("--save-interval")]
    _one_line(_module("megatron_ualm.finetune", "--pretrained-checkpoint", str(root / "ualm"), *common, *no_interval,
                      ok=False), "--save needs --save-interval")
    _one_line(_module("megatron_ualm.finetune", "--pretrained-checkpoint", str(root / "ualm"), *common, *TRAIN,
                      "--ffn-hidden-size", "128", ok=False), "ffn_hidden_size 160 (checkpoint) vs 128", "drop the flags")
    _one_line(_module("megatron_ualm.finetune", "--pretrained-checkpoint", str(root / "ualm"), *common, *TRAIN,
                      "--flavor", "debug", ok=False), "--flavor debug does not match", "Omit --flavor")
    assert not os.path.exists(tmp_path / "run")  # a refused run creates nothing


def test_shards_with_audio_in_clips_need_a_model_with_an_encoder(imported, tmp_path, audio_dir):
    """The other side of the rule: a shard that holds clips is refused in one line, naming it."""
    root = imported
    manifest = tmp_path / "und.jsonl"
    clip = "wav0.wav"  # a 16 kHz tone of the data suite's clips
    manifest.write_text("".join(json.dumps({"messages": [
        {"role": "user", "audio": os.path.join(audio_dir, clip)}, {"role": "user", "content": "w3 w4"},
        {"role": "assistant", "content": "w5 w6"}]}) + "\n" for _ in range(8)))
    _tool("preprocess_chat", "--input", str(manifest), "--output", str(tmp_path / "shards"), "--tokenizer",
          str(root / "llm"), "--no-progress")
    _tool("build_blend", str(tmp_path / "shards"), "--output", str(tmp_path / "blend.json"))
    _one_line(_module("megatron_ualm.finetune", "--pretrained-checkpoint", str(root / "ualm"), "--load",
                      str(tmp_path / "run"), "--save", str(tmp_path / "run"), "--blend-file", str(tmp_path / "blend.json"),
                      "--lr", "1e-4", *TRAIN, ok=False), "s of audio in", "no audio encoder", "chat-00000")
