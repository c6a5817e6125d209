"""DPO maths on one process: log-probabilities against a slow computation from the full logits,
the loss against its formula, and ln 2 at the start (reference == policy) for any beta."""

import math

import pytest
import torch

from megatron_ualm import api
from megatron_ualm.config import make_config
from megatron_ualm.data.preference import collate_pairs
from megatron_ualm.data.sequence import Message
from megatron_ualm.posttraining.dpo_loss import (DPOConfig, dpo_loss, score_batches, sequence_logp, stream_logps,
                                             stream_weights)
from megatron_ualm.synthetic import row_item
from megatron_ualm.vocab import UALMVocab

SEQ = 96
WEIGHTS = dict(text_loss_weight=0.7, codebook_loss_weights=(1.0, 0.5, 0.25, 0.125, 0.125, 0.25, 0.5, 2.0))


def pairs(config, seed=0):
    """Messages of three pairs: caption -> audio, audio + question -> text, multi-turn -> text + audio."""
    g = torch.Generator().manual_seed(seed)
    V, K, card = 200, config.num_codebooks, config.codebook_size
    text = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    codes = lambda t: torch.randint(0, card, (K, t), generator=g)  # noqa: E731
    history = [Message("user", "text", text=text(5)), Message("assistant", "text", text=text(4), loss=False),
               Message("user", "text", text=text(3))]
    return [
        ([Message("user", "text", text=text(6))],
         [Message("assistant", "audio", codes=codes(12))], [Message("assistant", "audio", codes=codes(9))]),
        ([Message("user", "audio", audio_in_frames=7, loss=False), Message("user", "text", text=text(4))],
         [Message("assistant", "text", text=text(8))], [Message("assistant", "text", text=text(11))]),
        (history,
         [Message("assistant", "text", text=text(5)), Message("assistant", "audio", codes=codes(6))],
         [Message("assistant", "text", text=text(7)), Message("assistant", "audio", codes=codes(10))]),
    ]


def supervised_cells(messages, vocab):
    """(position, token) of supervised stream-0 labels and (k, position, code) of supervised codebook
    labels, walked from the messages by the sequence format's rules (independent of build_sample)."""
    K = vocab.num_codebooks
    text, code, pos = [], [], 1  # position 0 is <|bos|>
    for i, m in enumerate(messages):
        train = m.role == "assistant" if m.loss is None else m.loss
        pos += 1  # role marker: never a target
        if train:
            text.append((pos, vocab.modality(m.modality)))
        pos += 1
        if m.text is not None:
            text += [(pos + j, t) for j, t in enumerate(m.text)] if train else []
            pos += len(m.text)
        elif m.codes is not None:
            T = m.codes.shape[1]
            if train:
                text += [(pos + j, vocab.audio_out if j < T else vocab.audio_flush) for j in range(T + K - 1)]
                code += [(k, pos + t + k, int(m.codes[k, t])) for k in range(K) for t in range(T)]
            pos += T + K - 1
        else:
            pos += m.audio_in_frames
        if train:
            same = i + 1 < len(messages) and messages[i + 1].role == m.role
            text.append((pos, vocab.eot if same else vocab.eos))
        pos += 1
    return text, code


@pytest.fixture(scope="module")
def setup(parallel_world_of_one):
    torch.manual_seed(0)
    model = api.build_model("debug", **WEIGHTS)
    model.eval()
    config, vocab = model.config, UALMVocab.from_config(model.config)
    conversations, items = [], []
    window = None
    for prompt, chosen, rejected in pairs(config):
        from megatron_ualm.models.encoder import window_geometry

        mels, frames, _ = window_geometry(config)
        window = torch.randn(1, mels, frames, generator=torch.Generator().manual_seed(1))
        feats = window if any(m.audio_in_frames for m in prompt) else None
        items.append({"chosen": row_item(prompt + chosen, vocab, feats), "rejected": row_item(prompt + rejected, vocab, feats),
                      "reference": None})
        conversations += [prompt + chosen, prompt + rejected]
    batch = collate_pairs(items, SEQ, vocab)
    return model, config, vocab, batch, conversations


def slow_stream_logps(model, batch, conversations, vocab):
    """[rows, 1 + K] float64 log-prob sums: log-softmax of the gathered logits at each label."""
    with torch.no_grad():
        text_logits, code_logits = api.logits(model, batch.rows)  # [b, s, V], [b, K, s, card]
    text_lp = torch.log_softmax(text_logits.double(), dim=-1)
    code_lp = torch.log_softmax(code_logits.double(), dim=-1)
    out = torch.zeros(len(conversations), 1 + vocab.num_codebooks, dtype=torch.float64)
    for r, messages in enumerate(conversations):
        text, code = supervised_cells(messages, vocab)
        for pos, token in text:  # the label at position p is predicted at input position p - 1
            out[r, 0] += text_lp[r, pos - 1, token]
        for k, pos, c in code:
            out[r, 1 + k] += code_lp[r, k, pos - 1, c]
    return out


def test_logps_equal_slow_computation_per_stream_and_weighted(setup):
    model, config, vocab, batch, conversations = setup
    slow = slow_stream_logps(model, batch, conversations, vocab)
    with torch.no_grad():
        output = model(**api.model_inputs(batch.rows, config))
    fast = stream_logps(output, batch.rows.loss_mask, batch.rows.code_loss_mask)
    assert slow[:, 1:].abs().sum() > 0 and (slow[0::2, 1:] != 0).any()  # codebook cells are in it
    torch.testing.assert_close(fast.sums.double(), slow, rtol=1e-5, atol=1e-4)
    counts = torch.tensor([[len(t), *[sum(1 for k_, _, _ in c if k_ == k) for k in range(vocab.num_codebooks)]]
                           for t, c in (supervised_cells(m, vocab) for m in conversations)], dtype=torch.float32)
    assert torch.equal(fast.counts, counts)
    w = stream_weights(config).double()
    for normalize in (False, True):
        expected = (slow * w).sum(-1) / (counts.sum(-1).double() if normalize else 1.0)
        got = sequence_logp(fast.sums, fast.counts, stream_weights(config), normalize)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_loss_and_report_follow_the_formula(setup, normalize):
    model, config, vocab, batch, conversations = setup
    slow = slow_stream_logps(model, batch, conversations, vocab)
    counts = torch.tensor([[len(t) + len(c)] for t, c in (supervised_cells(m, vocab) for m in conversations)],
                          dtype=torch.float64)[:, 0]
    P, K = len(conversations) // 2, vocab.num_codebooks
    reference = (slow + torch.linspace(-3, 3, slow.numel(), dtype=torch.float64).view_as(slow)).float().view(P, 2, 1 + K)
    dpo = DPOConfig(beta=0.3, sft_loss_weight=0.5, length_normalization=normalize)
    with torch.no_grad():
        output = model(**api.model_inputs(batch.rows, config))
    loss, num, report = dpo_loss(config, dpo, batch.rows.loss_mask, batch.rows.code_loss_mask, reference, output)

    w = stream_weights(config).double()
    scale = counts if normalize else torch.ones_like(counts)
    logp = (slow * w).sum(-1) / scale
    ref = (reference.view(2 * P, 1 + K).double() * w).sum(-1) / scale
    margin = 0.3 * ((logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2]))
    dpo_terms = -torch.nn.functional.logsigmoid(margin)
    sft_terms = -(slow[0::2] * w).sum(-1) / counts[0::2]
    assert int(num) == P
    torch.testing.assert_close(loss.double(), (dpo_terms + 0.5 * sft_terms).sum(), rtol=1e-5, atol=1e-5)
    mean = lambda name: (report[name][0] / report[name][1]).item()  # noqa: E731
    assert mean("dpo loss") == pytest.approx(dpo_terms.mean().item(), rel=1e-5)
    assert mean("sft loss") == pytest.approx(sft_terms.mean().item(), rel=1e-5)
    assert mean("reward margin") == pytest.approx(margin.mean().item(), rel=1e-4, abs=1e-5)
    assert mean("reward accuracy") == pytest.approx((margin > 0).double().mean().item())
    assert mean("rejected codebook_7 logp") == pytest.approx(slow[1::2, 8].mean().item(), rel=1e-5)
    assert mean("chosen text logp") == pytest.approx(slow[0::2, 0].mean().item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 25.0])
def test_first_loss_is_ln2_when_reference_is_policy(setup, beta):
    model, config, vocab, batch, _ = setup
    P, K = batch.num_pairs, vocab.num_codebooks
    reference = score_batches(model, [batch], SEQ)[0].view(P, 2, 1 + K)
    output = model(**api.model_inputs(batch.rows, config))
    loss, _, report = dpo_loss(config, DPOConfig(beta=beta), batch.rows.loss_mask, batch.rows.code_loss_mask,
                               reference, output)
    assert (loss / P).item() == pytest.approx(math.log(2), abs=1e-6)
    assert report["reward accuracy"][0].item() == 0.0
    loss.backward()  # the gradient at margin 0 is beta/2 * (grad logp_r - grad logp_c): not zero
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)


def test_config_and_shape_errors(setup):
    model, config, vocab, batch, _ = setup
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="sft_loss_weight"):
        DPOConfig(sft_loss_weight=-1)
    output = (torch.zeros(3, SEQ), torch.zeros(3, vocab.num_codebooks, SEQ))
    with pytest.raises(ValueError, match="row pairs"):
        dpo_loss(config, DPOConfig(), torch.ones(3, SEQ), torch.ones(3, 8, SEQ), torch.zeros(1, 2, 9), output)
