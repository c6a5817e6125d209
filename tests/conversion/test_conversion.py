"""HF Qwen2 <-> UALM checkpoint conversion on a tiny random model (float32, CPU).

The HF side is a random ``Qwen2ForCausalLM`` with the debug flavor's shapes (vocab 256, of
which 224 are tokenizer ids and 32 the UALM specials) saved in several safetensors shards,
plus a tiny ``Qwen2AudioEncoder``. Import runs in this process; loading at TP=1, TP=2 and
PP=2 runs in torchrun workers through Megatron's tracker and ``dist_checkpointing``.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_ualm.config import make_config
from megatron_ualm.conversion import ConversionError, export_hf, import_hf, layout
from megatron_ualm import checkpoint_format
from megatron_ualm.conversion import megatron_io
from ualm_testing import run_ok, torchrun

pytestmark = pytest.mark.slow  # measured above 5 s on 2 cores: scripts/run_tests.sh --quick leaves it out

WORKER = os.path.join(os.path.dirname(__file__), "load_worker.py")
TEXT_VOCAB = 224
LOGITS_TOL = 1e-5


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny HF Qwen2 LM (3 safetensors shards), a tiny audio encoder, tokens and HF logits."""
    from transformers import Qwen2AudioEncoderConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=256, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=512, initializer_range=0.1,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a layout slip cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(root / "llm", max_shard_size="60KB")
    assert len([f for f in os.listdir(root / "llm") if f.endswith(".safetensors")]) > 2
    encoder_cfg = make_config("debug").audio_encoder_config
    encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**encoder_cfg))
    encoder.save_pretrained(root / "encoder")
    tokens = torch.randint(0, TEXT_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    with torch.no_grad():
        logits = model(tokens).logits  # [b, s, 256]
    return dict(root=root, llm=str(root / "llm"), encoder=str(root / "encoder"), tokens=tokens, logits=logits,
                encoder_state=encoder.state_dict())


@pytest.fixture(scope="module")
def imported(hf_dirs):
    out = str(hf_dirs["root"] / "ualm")
    ckpt = import_hf(hf_dirs["llm"], out, audio_encoder=hf_dirs["encoder"], codec="hf-audio/xcodec-hubert-general",
                     text_vocab_size=TEXT_VOCAB, tensor_model_parallel_size=2, progress=False)
    return out, ckpt


def _load_logits(load_dir, tokens_path, out_path, tp, pp):
    run_ok(torchrun(tp * pp, WORKER, "--load", load_dir, "--tokens", tokens_path, "--out", out_path, "--tp", str(tp),
                    "--pp", str(pp)), timeout=300)
    return torch.load(out_path)


@pytest.fixture(scope="module")
def ualm_logits(hf_dirs, imported):
    """Logits of the imported checkpoint loaded at TP=1 (shared by several tests)."""
    return _load_logits(imported[0], str(hf_dirs["root"] / "tokens.pt"), str(hf_dirs["root"] / "tp1.pt"), 1, 1)


def test_import_tp1_matches_transformers(hf_dirs, ualm_logits):
    assert ualm_logits.shape == hf_dirs["logits"].shape
    diff = (ualm_logits[..., :TEXT_VOCAB] - hf_dirs["logits"][..., :TEXT_VOCAB]).abs().max().item()
    assert diff <= LOGITS_TOL, diff


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_import_loads_at_tp_pp(hf_dirs, imported, ualm_logits, tp, pp):
    got = _load_logits(imported[0], str(hf_dirs["root"] / "tokens.pt"), str(hf_dirs["root"] / f"tp{tp}pp{pp}.pt"), tp, pp)
    diff = (got[..., :TEXT_VOCAB] - hf_dirs["logits"][..., :TEXT_VOCAB]).abs().max().item()
    assert diff <= LOGITS_TOL, diff
    assert (got - ualm_logits).abs().max().item() <= LOGITS_TOL  # special rows agree across layouts too


def test_checkpoint_layout_and_record(imported):
    out, ckpt = imported
    assert open(os.path.join(out, checkpoint_format.TRACKER)).read() == "release"
    record = megatron_io.load_common(ckpt)["ualm"]
    assert record["flavor"] == "debug"
    assert record["codec"]["name"] == "hf-audio/xcodec-hubert-general"
    assert record["target_parallel"]["tensor_model_parallel_size"] == 2
    assert record["arch"]["audio_encoder_type"] == "qwen2_audio"
    shapes = megatron_io.stored_shapes(ckpt)
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == (4, 128, 64)
    assert shapes["codebook_heads.weight"] == (8, 64, 64)


def _all_tensors(ckpt):
    model = megatron_io.structure_model(_config_of(ckpt))
    out = {}
    for unit in megatron_io.model_units(model).values():
        out.update(megatron_io.load_unit(ckpt, unit.slots))
    return out


def _config_of(ckpt):
    return checkpoint_format.config_from_description(megatron_io.load_common(ckpt)["ualm"])


def test_initialisation_rule(hf_dirs, imported):
    from safetensors import safe_open

    tensors = _all_tensors(imported[1])
    with safe_open(os.path.join(hf_dirs["llm"], _shard_of(hf_dirs["llm"], "model.embed_tokens.weight")), "pt") as f:
        hf_emb = f.get_tensor("model.embed_tokens.weight")
    emb = tensors["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:TEXT_VOCAB], hf_emb[:TEXT_VOCAB])
    specials = emb[TEXT_VOCAB:]
    text_mean, text_std = hf_emb[:TEXT_VOCAB].mean(0), hf_emb[:TEXT_VOCAB].std()
    assert (specials - text_mean).std() < 0.2 * text_std  # mean + small noise
    assert (specials - text_mean).abs().max() > 0  # but distinct rows
    cb = tensors["embedding.codebook_embeddings.weight"]
    assert abs(cb.std().item() / text_std.item() - 1) < 0.1
    enc = {k[len("audio_encoder.model."):]: v for k, v in tensors.items() if k.startswith("audio_encoder.model.")}
    assert enc.keys() == hf_dirs["encoder_state"].keys()
    assert all(torch.equal(enc[k], v) for k, v in hf_dirs["encoder_state"].items())


def _shard_of(directory, name):
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


def test_export_loads_in_transformers_and_reimports_exactly(hf_dirs, imported, ualm_logits):
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    root = hf_dirs["root"]
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer_config.json").write_text("{}")
    exported = export_hf(imported[0], str(root / "exported"), tokenizer=str(root / "tok"), max_shard_size="100KB",
                         progress=False)
    assert os.path.isfile(os.path.join(exported, "tokenizer_config.json"))
    script = os.path.join(os.path.dirname(__file__), "hf_logits.py")
    proc = subprocess.run([sys.executable, script, exported, str(root / "tokens.pt"), str(root / "exported.pt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logits = torch.load(root / "exported.pt")
    assert (logits[..., :TEXT_VOCAB] - hf_dirs["logits"][..., :TEXT_VOCAB]).abs().max().item() <= LOGITS_TOL
    assert (logits - ualm_logits).abs().max().item() <= LOGITS_TOL  # all rows, specials included
    encoder = Qwen2AudioEncoder.from_pretrained(os.path.join(exported, "audio_encoder"))
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in hf_dirs["encoder_state"].items())

    again = import_hf(exported, str(root / "reimported"), progress=False)
    first, second = _all_tensors(imported[1]), _all_tensors(again)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


def test_layout_matches_per_head_loop():
    nh, ng, d, h = 6, 2, 3, 5
    q, k, v = torch.randn(nh * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    rows = []
    for g in range(ng):  # Megatron's grouped order, head by head
        for i in range(nh // ng):
            head = g * (nh // ng) + i
            rows.append(q[head * d:(head + 1) * d])
        rows.append(k[g * d:(g + 1) * d])
        rows.append(v[g * d:(g + 1) * d])
    fused = layout.fuse_qkv(q, k, v, nh, ng)
    assert torch.equal(fused, torch.cat(rows))
    assert all(torch.equal(a, b) for a, b in zip(layout.split_qkv(fused, nh, ng), (q, k, v)))


def test_errors_name_what_is_wrong(hf_dirs, tmp_path):
    with pytest.raises(ConversionError, match=r"flavor 'qwen2.5-7b'.*hidden_size expected 3584, got 64"):
        import_hf(hf_dirs["llm"], str(tmp_path / "a"), flavor="qwen2.5-7b", progress=False)
    with pytest.raises(ConversionError, match="tensor_model_parallel_size=3"):
        import_hf(hf_dirs["llm"], str(tmp_path / "b"), tensor_model_parallel_size=3, text_vocab_size=TEXT_VOCAB,
                  progress=False)
    missing = tmp_path / "missing"
    shutil.copytree(hf_dirs["llm"], missing)
    os.remove(missing / _shard_of(hf_dirs["llm"], "model.norm.weight"))
    with pytest.raises(ConversionError, match="missing file"):
        import_hf(str(missing), str(tmp_path / "c"), text_vocab_size=TEXT_VOCAB, progress=False)
    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["llm"], bad)
    shard = _shard_of(hf_dirs["llm"], "model.norm.weight")
    from safetensors.torch import load_file

    tensors = load_file(bad / shard)
    tensors["model.norm.weight"] = torch.ones(63)
    save_file(tensors, bad / shard, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model.norm.weight.*shape \(63,\), expected \(64,\)"):
        import_hf(str(bad), str(tmp_path / "d"), text_vocab_size=TEXT_VOCAB, no_audio_encoder=True, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="not empty"):
        import_hf(hf_dirs["llm"], str(tmp_path / "full"), text_vocab_size=TEXT_VOCAB, no_audio_encoder=True,
                  progress=False)


def _with_tokenizer(src, dst, size):
    """A copy of a HF directory with a word-level tokenizer.json of exactly ``size`` ids."""
    from tokenizers import Tokenizer, models

    shutil.copytree(src, dst)
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(os.path.join(dst, "tokenizer.json"))
    return str(dst)


def test_hf_flavor_takes_the_text_vocabulary_from_the_tokenizer(hf_dirs, tmp_path):
    from safetensors import safe_open

    from megatron_ualm.data.tokenizer import TextTokenizer

    llm = _with_tokenizer(hf_dirs["llm"], tmp_path / "llm", 250)  # 250 + 32 specials > 256 HF rows
    ckpt = import_hf(llm, str(tmp_path / "ualm"), flavor="hf", no_audio_encoder=True, progress=False)
    record = megatron_io.load_common(ckpt)["ualm"]
    assert record["arch"]["text_vocab_size"] == 250 and record["arch"]["vocab_size"] == 384  # grown, padded to 128
    assert record["vocab"]["tokenizer"]["sha256"] == TextTokenizer(llm).sha256
    emb = _all_tensors(ckpt)["embedding.word_embeddings.weight"]
    with safe_open(os.path.join(hf_dirs["llm"], _shard_of(hf_dirs["llm"], "model.embed_tokens.weight")), "pt") as f:
        hf_emb = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(emb[:250], hf_emb[:250])  # every tokenizer row kept
    assert emb[282:].abs().sum() == 0  # new padding rows
    with pytest.raises(ConversionError, match=r"--text-vocab-size 224 would put UALM special tokens on rows 224..249"):
        import_hf(llm, str(tmp_path / "no"), flavor="hf", text_vocab_size=224, no_audio_encoder=True, progress=False)
    with pytest.raises(ConversionError, match="--flavor hf takes the text vocabulary from the tokenizer"):
        import_hf(hf_dirs["llm"], str(tmp_path / "no2"), flavor="hf", no_audio_encoder=True, progress=False)
    assert not os.path.exists(tmp_path / "no") and not os.path.exists(tmp_path / "no2")


def test_generate_loads_an_hf_flavor_checkpoint_without_flags(hf_dirs, tmp_path):
    llm = _with_tokenizer(hf_dirs["llm"], tmp_path / "llm", 200)
    out = str(tmp_path / "ualm")
    import_hf(llm, out, flavor="hf", no_audio_encoder=True, progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ualm.generate", "--load", out, "--tokenizer", llm, "--mode", "respond",
         "--modality", "text", "--prompt", "w1 w2 w3", "--max-new-tokens", "4", "--max-audio-seconds", "0.2",
         "--out", str(tmp_path / "gen")],
        capture_output=True, text=True, timeout=300, env=dict(env, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "gen" / "results.jsonl").read_text())["texts"]


def test_failed_import_leaves_nothing_and_a_rerun_works(hf_dirs, tmp_path, monkeypatch):
    from megatron_ualm.conversion import importer

    unit = importer._Source.unit

    def fail_at_layer_2(self, name, u):
        if name == "decoder.layers.2":
            raise RuntimeError("killed mid-conversion")
        return unit(self, name, u)

    out = tmp_path / "ualm"
    monkeypatch.setattr(importer._Source, "unit", fail_at_layer_2)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        import_hf(hf_dirs["llm"], str(out), text_vocab_size=TEXT_VOCAB, no_audio_encoder=True, progress=False)
    assert os.listdir(tmp_path) == []  # neither the output nor its .partial directory
    monkeypatch.setattr(importer._Source, "unit", unit)
    ckpt = import_hf(hf_dirs["llm"], str(out), text_vocab_size=TEXT_VOCAB, no_audio_encoder=True, progress=False)
    assert sorted(os.listdir(out)) == [checkpoint_format.TRACKER, "release"] and ckpt == str(out / "release")
