"""Single-process checks of UALMModel: embeddings, audio splice, masks, losses."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_ualm import api
from megatron_ualm.config import make_config
from megatron_ualm.data.batch import collate
from megatron_ualm.data.sequence import Message, build_sample
from megatron_ualm.synthetic import mixed_batch
from megatron_ualm.vocab import UALMVocab

SEQ = 64


@pytest.fixture(scope="module")
def model(parallel_world_of_one):
    torch.manual_seed(0)
    m = api.build_model("debug")
    m.eval()
    return m


@pytest.fixture(scope="module")
def batch(model):
    return mixed_batch(model.config, SEQ, seed=1)


def test_sequence_layout_of_a_generation_sample():
    v = UALMVocab.from_config(make_config("debug"))
    codes = torch.arange(8 * 3).view(8, 3) % 64
    s = build_sample([Message("user", "text", text=[5, 6]), Message("assistant", "audio", codes=codes)], v)
    head = [v.bos, v.role("user"), v.modality("text"), 5, 6, v.eos, v.role("assistant"), v.modality("audio")]
    steps = 3 + 8 - 1
    assert s.tokens.tolist() == head + [v.audio_out] * 3 + [v.audio_flush] * 7 + [v.eos]
    # Targets: the assistant's modality marker, every audio step, the terminator.
    assert s.text_target.tolist() == [False] * 7 + [True] * (1 + steps + 1)
    # Codebook k holds frame t at step 8 + t + k and nothing else.
    for k in range(8):
        row = s.codes[k].tolist()
        assert row[8 + k: 8 + k + 3] == codes[k].tolist()
        assert sum(c != v.code_empty for c in row) == 3
    assert torch.equal(s.code_target, s.codes != v.code_empty)


def test_same_role_turns_end_with_eot():
    v = UALMVocab.from_config(make_config("debug"))
    s = build_sample([Message("user", "audio", audio_in_frames=4), Message("user", "text", text=[1]),
                      Message("assistant", "text", text=[2])], v)
    assert s.tokens.tolist().count(v.eot) == 1 and s.tokens.tolist().count(v.eos) == 2
    assert (s.tokens == v.audio_in).sum() == 4 and s.audio_in_frames == [4]


def _reference_embedding(model, batch, audio_rows):
    """Slow loop: word embedding + each non-empty codebook's row, audio rows on placeholders."""
    v, emb = model.vocab, model.embedding
    b, s = batch.tokens.shape
    out = torch.zeros(s, b, model.config.hidden_size)
    row = 0
    for i in range(b):
        for j in range(s):
            tok = int(batch.tokens[i, j])
            if tok == v.audio_in:
                out[j, i] = audio_rows[row]
                row += 1
                continue
            out[j, i] = emb.word_embeddings.weight[tok]
            for k in range(v.num_codebooks):
                c = int(batch.codes[i, k, j])
                if c != v.code_empty:
                    out[j, i] += emb.codebook_embeddings.weight[k * v.codebook_size + c]
    assert row == audio_rows.shape[0]
    return out


def test_embedding_sums_codebooks_and_adapter_lands_exactly_on_placeholders(model, batch):
    with torch.no_grad():
        audio_rows = model.encode_audio(batch.audio_in_features, batch.audio_in_lengths)
        got = model.embedding(batch.tokens, batch.codes, audio_rows)
        want = _reference_embedding(model, batch, audio_rows)
    placeholders = (batch.tokens == model.vocab.audio_in).T  # [s, b]
    assert int(placeholders.sum()) == int(batch.audio_in_lengths.sum()) > 0
    assert torch.equal(got[placeholders], audio_rows)  # exact: written, not added
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_adapter_keeps_only_valid_frames_of_each_window(model):
    feats = torch.randn(2, 16, 200)
    with torch.no_grad():
        full = model.encode_audio(feats, torch.tensor([50, 50]))
        part = model.encode_audio(feats, torch.tensor([7, 3]))
    assert full.shape == (100, model.config.hidden_size)
    assert torch.equal(part, torch.cat([full[:7], full[50:53]]))


def test_placeholder_count_mismatch_is_a_clear_error(model, batch):
    bad = dataclasses.replace(batch, audio_in_lengths=batch.audio_in_lengths - 1)
    with pytest.raises(ValueError, match="placeholders"):
        api.run_batch(model, bad)


def test_masks_exclude_pad_prompt_placeholders_and_empty_cells(model, batch):
    v = model.vocab
    lm, cm = batch.loss_mask.bool(), batch.code_loss_mask.bool()
    assert not lm[batch.labels == v.pad].any()
    assert not lm[batch.labels == v.audio_in].any()
    assert not lm[batch.labels == v.role("assistant")].any()
    assert not cm[batch.code_labels == v.code_empty].any()
    # The understanding sample's prompt (user turn) is never a target.
    user_end = batch.tokens[1].tolist().index(v.eos)
    assert not lm[1, : user_end].any() and lm[1].any()
    # Every real code of the generation sample is a target.
    assert cm[2].sum() == (batch.code_labels[2] != v.code_empty).sum() > 0


def test_loss_ignores_labels_where_masked(model, batch):
    base = api.run_batch(model, batch)
    scrambled = dataclasses.replace(
        batch,
        labels=torch.where(batch.loss_mask.bool(), batch.labels, torch.randint_like(batch.labels, 0, 200)),
        code_labels=torch.where(batch.code_loss_mask.bool(), batch.code_labels, torch.randint_like(batch.code_labels, 0, 64)),
    )
    again = api.run_batch(model, scrambled)
    assert torch.equal(base.loss, again.loss) and torch.equal(base.num_tokens, again.num_tokens)


def test_per_codebook_losses_match_manual_cross_entropy(model, batch):
    result = api.run_batch(model, batch)
    with torch.no_grad():
        text_logits, code_logits = api.logits(model, batch)  # [b, s, V], [b, K, s, card]
    lm = batch.loss_mask.bool()
    text_ce = F.cross_entropy(text_logits[lm], batch.labels[lm], reduction="sum")
    torch.testing.assert_close(result.report["text loss"], torch.stack([text_ce, lm.sum().float()]))
    total = text_ce.clone()
    for k in range(model.config.num_codebooks):
        m = batch.code_loss_mask[:, k].bool()
        ce = F.cross_entropy(code_logits[:, k][m], batch.code_labels[:, k][m], reduction="sum")
        torch.testing.assert_close(result.report[f"codebook_{k} loss"], torch.stack([ce, m.sum().float()]))
        total += ce
    torch.testing.assert_close(result.loss, total)
    assert int(result.num_tokens) == int(lm.sum() + batch.code_loss_mask.sum())


def test_codebook_loss_weights_apply(model, batch):
    base = api.run_batch(model, batch)
    weights = (0.0,) + (1.0,) * 7
    model.config.codebook_loss_weights = weights
    try:
        weighted = api.run_batch(model, batch)
    finally:
        model.config.codebook_loss_weights = (1.0,) * 8
    torch.testing.assert_close(weighted.loss, base.loss - base.report["codebook_0 loss"][0])


def test_gradients_reach_adapter_and_codebooks_but_not_the_encoder(model, batch):
    model.zero_grad(set_to_none=True)
    api.run_batch(model, batch).loss.backward()
    assert all(p.grad is None for p in model.audio_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.audio_adapter.parameters())
    assert model.embedding.codebook_embeddings.weight.grad.abs().sum() > 0
    assert model.codebook_heads.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_packed_position_ids_restart_rope(model):
    """Two documents packed in one row with a block mask equal the two run separately."""
    v = model.vocab
    a = build_sample([Message("user", "text", text=[1, 2, 3]), Message("assistant", "text", text=[4, 5])], v)
    b = build_sample([Message("user", "text", text=[6, 7]), Message("assistant", "text", text=[8, 9, 10])], v)
    la, lb = len(a), len(b)
    seq = la + lb
    packed = collate([a], seq, v)
    packed.tokens[0] = torch.cat([a.tokens, b.tokens])
    packed.codes[0] = torch.cat([a.codes, b.codes], dim=1)
    packed.position_ids[0] = torch.cat([torch.arange(la), torch.arange(lb)])
    doc = torch.cat([torch.zeros(la), torch.ones(lb)]).long()
    causal = torch.ones(seq, seq).tril().bool()
    packed.attention_mask = ~((doc[:, None] == doc[None, :]) & causal)[None, None]
    with torch.no_grad():
        t_packed, _ = api.logits(model, packed)
        t_b, _ = api.logits(model, collate([b], lb, v))
    torch.testing.assert_close(t_packed[0, la:], t_b[0, :lb], rtol=1e-5, atol=1e-5)
