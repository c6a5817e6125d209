"""Sampling filters against brute force; guidance endpoints."""

import torch

from megatron_ualm.inference.sampling import SamplingParams, filter_logits, guide, sample


def test_top_k_keeps_the_k_largest():
    logits = torch.randn(5, 50)
    out = filter_logits(logits, top_k=7)
    for row, kept in zip(logits, out):
        assert set(torch.isfinite(kept).nonzero().flatten().tolist()) == set(row.topk(7).indices.tolist())


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.randn(4, 30)
    out = filter_logits(logits, top_p=0.6)
    for row, kept in zip(logits, out):
        probs = row.softmax(-1)
        order = probs.argsort(descending=True).tolist()
        nucleus, mass = [], 0.0
        for i in order:  # slow reference: add ids until the mass reaches p
            nucleus.append(i)
            mass += probs[i].item()
            if mass >= 0.6:
                break
        assert set(torch.isfinite(kept).nonzero().flatten().tolist()) == set(nucleus)


def test_sampling_respects_masks_and_seed():
    logits = torch.randn(64, 20)
    logits[:, 10:] = float("-inf")
    params = SamplingParams(temperature=1.3, top_k=5)
    a = sample(logits, params, torch.Generator().manual_seed(3))
    b = sample(logits, params, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and int(a.max()) < 10
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


def test_guidance_endpoints():
    c, u = torch.randn(3, 9), torch.randn(3, 9)
    assert torch.equal(guide(c, u, 1.0), c) and torch.equal(guide(c, u, 0.0), u)
    torch.testing.assert_close(guide(c, u, 3.0), u + 3.0 * (c - u))
