import pytest

from megatron_ualm import api
from megatron_ualm.training.freeze import apply_freeze_policy


@pytest.fixture()
def model(parallel_world_of_one):
    return api.build_model("debug")


def test_alignment_trains_only_adapter_codebook_embeddings_and_heads(model):
    apply_freeze_policy(model, "alignment")
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"audio_adapter.projector", "embedding.codebook_embeddings", "codebook_heads.weight"}


def test_full_trains_everything_but_the_encoder(model):
    apply_freeze_policy(model, "alignment")
    apply_freeze_policy(model, "full")
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith("audio_encoder."))


def test_unknown_policy_is_rejected(model):
    with pytest.raises(ValueError, match="freeze policy"):
        apply_freeze_policy(model, "lora")
