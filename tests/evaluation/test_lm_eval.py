"""The text benchmarks lm-eval runs, through the HF export: a UALM checkpoint (imported from a
tiny random Qwen2) -> ``export_hf`` -> the ``lm_eval`` command line with its ``hf`` model on a
tiny local multiple-choice task (offline: the task reads a local JSONL)."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out


def _tiny_hf_qwen(root):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "dog bark rain wind engine car bird song piano wave what makes this sound answer".split()
    tok.train_from_iterator([" ".join(words)] * 30, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "<|endoftext|>"],
                                                                        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="[UNK]", pad_token="<|endoftext|>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    # The debug flavor's shapes: 224 text rows + 32 UALM specials.
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, max_position_embeddings=512)
    Qwen2ForCausalLM(cfg).save_pretrained(root)
    return root


def test_export_then_lm_eval(tmp_path):
    from megatron_ualm.conversion import export_hf, import_hf

    hf = _tiny_hf_qwen(str(tmp_path / "qwen"))
    ckpt = import_hf(hf, str(tmp_path / "ualm"), no_audio_encoder=True, text_vocab_size=224, progress=False)
    exported = export_hf(ckpt, str(tmp_path / "exported"), tokenizer=hf, progress=False)

    rows = [{"question": "what makes this sound: bark", "choices": [" dog", " car", " rain"], "answer": 0},
            {"question": "what makes this sound: engine", "choices": [" bird", " car"], "answer": 1},
            {"question": "what makes this sound: song", "choices": [" bird", " wave"], "answer": 0}]
    (tmp_path / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TORCHDYNAMO_DISABLE="1",
               OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    cmd = [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf",
           "--model_args", f"pretrained={exported},dtype=float32", "--tasks", "tiny_mc",
           "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "2",
           "--output_path", str(tmp_path / "lm_eval_out"), "--log_samples"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "lm_eval_out") for f in fs if f.startswith("results")]
    results = json.loads(open(found[0]).read())["results"]["tiny_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0
    samples = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "lm_eval_out") for f in fs
               if f.startswith("samples_tiny_mc")]
    assert samples, "lm-eval wrote no per-sample log"
    assert len(open(samples[0]).read().splitlines()) == len(rows)  # every question was scored
