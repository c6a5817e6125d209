import pytest

from megatron_ualm.config import FLAVORS, make_config

SHAPES = {  # hidden, layers, heads, kv heads, ffn, vocab rows, tied (REFERENCE.md section 3)
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-3b": (2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, False),
}


@pytest.mark.parametrize("flavor", sorted(SHAPES))
def test_qwen_flavors_have_the_published_shapes(flavor):
    c = make_config(flavor)
    got = (c.hidden_size, c.num_layers, c.num_attention_heads, c.num_query_groups,
           c.ffn_hidden_size, c.vocab_size, c.share_embeddings_and_output_weights)
    assert got == SHAPES[flavor]
    assert (c.normalization, c.layernorm_epsilon, c.rotary_base) == ("RMSNorm", 1e-6, 1e6)
    assert c.gated_linear_unit and c.add_qkv_bias and not c.add_bias_linear
    assert (c.num_codebooks, c.codebook_size) == (8, 1024)


def test_every_flavor_builds():
    for name in FLAVORS:
        make_config(name)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vocab_size=250), "leaves no room for the special tokens"),
        (dict(tensor_model_parallel_size=3, num_attention_heads=6, num_query_groups=3, kv_channels=16), "not divisible by tensor_model_parallel_size"),
        (dict(codebook_loss_weights=(1.0, 2.0)), "one weight per codebook"),
        (dict(cfg_condition_dropout=1.0), "cfg_condition_dropout"),
        (dict(audio_encoder_type="wav2vec"), "audio_encoder_type"),
        (dict(fp8="hybrid"), "Transformer Engine"),
        (dict(transformer_impl="transformer_engine"), "Transformer Engine"),
    ],
)
def test_bad_combinations_say_what_to_change(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("debug", **overrides)


def test_unknown_flavor_and_field():
    with pytest.raises(ValueError, match="unknown flavor"):
        make_config("qwen3")
    with pytest.raises(ValueError, match="unknown UALMConfig field"):
        make_config("debug", hidden=3)
