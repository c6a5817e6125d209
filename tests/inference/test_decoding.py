"""Decoding: delay pattern vs teacher forcing, KV cache vs recomputation, padding, CFG, audio in."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_ualm.codebooks.delay import apply_delay, delay_valid_mask
from megatron_ualm.data.sequence import Message, build_sample
from megatron_ualm.inference import GREEDY, GenerationParams, SamplingParams, build_prompt, empty_condition_prompt
from megatron_ualm.inference.audio import AudioListener
from megatron_ualm.inference.decoding import AUDIO, TEXT, _Row

FIXED = dict(max_audio_seconds=0.3, min_audio_seconds=0.3, stop_at_eot=True, max_new_tokens=4)  # 15 frames, no early stop
SAMPLED = SamplingParams(temperature=1.0, top_k=20, top_p=0.95)


def text_msg(ids, role="user"):
    return Message(role, "text", text=list(ids))


def full_logits(model, tokens, codes, features=None, lengths=None):
    """Teacher forcing: one forward over the whole sequence, no cache."""
    with torch.no_grad():
        return model(input_ids=tokens[None], codes=codes[None], audio_in_features=features,
                     audio_in_lengths=lengths, gather_output=True)


def test_greedy_audio_equals_teacher_forcing_argmax(model, generator):
    v, K = generator.vocab, model.config.num_codebooks
    messages = [text_msg([5, 17, 42, 99, 3])]
    prompt = build_prompt(messages, v, modality="audio")
    params = GenerationParams(text=GREEDY, audio=GREEDY, cfg_weight=None, **FIXED)
    out = generator.generate([prompt], params)[0]
    (codes,) = out.audio
    T = codes.shape[1]
    assert T == 15 and out.segments[0].terminator in ("<|eos|>", "<|eot|>")
    # The reply laid out by the training format is exactly prompt + generated columns.
    sample = build_sample(messages + [Message("assistant", "audio", codes=codes)], v)
    L = len(prompt)
    n = L + T + K - 1
    assert torch.equal(sample.tokens[:n], torch.cat([prompt.tokens, out.tokens[: T + K - 1]]))
    assert torch.equal(sample.codes[:, :n], torch.cat([prompt.codes, out.codes[:, : T + K - 1]], dim=1))
    # Every valid cell is the argmax of the teacher-forced logits one position earlier.
    _, code_logits = full_logits(model, sample.tokens, sample.codes)
    predicted = code_logits[0, :, L - 1 : L - 1 + T + K - 1].argmax(-1)  # [K, T + K - 1]
    delayed = apply_delay(codes[None], v.code_empty)[0]
    valid = delay_valid_mask(K, T)
    assert torch.equal(predicted[valid], delayed[valid])
    # The reverted codes are what the greedy decoder wrote, frame by frame.
    assert torch.equal(delayed[~valid], torch.full_like(delayed[~valid], v.code_empty))


def test_kv_cache_equals_recomputation_mixed_batch_with_cfg(generator):
    v = generator.vocab
    prompts = [
        build_prompt([text_msg([1, 2, 3, 4, 5, 6, 7, 8, 9])], v, modality="audio"),
        build_prompt([text_msg([10, 11])], v),  # the model chooses the modality
        build_prompt([text_msg([12, 13, 14, 15])], v, modality="text"),
    ]
    params = GenerationParams(text=SAMPLED, audio=SAMPLED, cfg_weight=3.0, max_new_tokens=12,
                              max_audio_seconds=0.2, min_audio_seconds=0.1, seed=7, output_scores=True)
    cached = generator.generate(prompts, params)
    full = generator.generate(prompts, dataclasses.replace(params, kv_cache=False))
    # The fixed-shape cache (what a CUDA graph replays) decodes the same replies.
    static = generator.generate(prompts, dataclasses.replace(params, static_cache=True))
    for a, b, c in zip(cached, full, static):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.codes, b.codes)
        assert torch.equal(a.tokens, c.tokens) and torch.equal(a.codes, c.codes)
        assert len(a.scores) == len(b.scores) == len(c.scores) > 0
        for (ta, ca), (tb, cb), (tc, cc) in zip(a.scores, b.scores, c.scores):
            torch.testing.assert_close(ta, tb, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ca, cb, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(tc, tb, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cc, cb, atol=1e-4, rtol=1e-4)
    assert cached[0].audio and 5 <= cached[0].audio[0].shape[1] <= 10
    # The cache's wrappers come off again.
    assert all(type(layer.self_attention.core_attention).__name__ == "DotProductAttention"
               for layer in generator.model.decoder.layers)


def test_left_padding_does_not_change_a_prompt(generator):
    """A prompt decoded in a padded batch gives what it gives alone (greedy)."""
    v = generator.vocab
    prompts = [build_prompt([text_msg(range(1, 30))], v, modality="audio"),
               build_prompt([text_msg([40, 41])], v, modality="audio")]
    params = GenerationParams(text=GREEDY, audio=GREEDY, cfg_weight=None, output_scores=True, **FIXED)
    batched = generator.generate(prompts, params)
    for p, b in zip(prompts, batched):
        alone = generator.generate([p], params)[0]
        assert torch.equal(alone.codes, b.codes)
        for (ta, ca), (tb, cb) in zip(alone.scores, b.scores):
            torch.testing.assert_close(ca, cb, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_cfg_weight_one_is_conditional_and_zero_is_unconditional(generator, weight):
    v = generator.vocab
    cond = build_prompt([text_msg([3, 1, 4, 1, 5, 9, 2, 6])], v, modality="audio")
    params = GenerationParams(text=GREEDY, audio=GREEDY, output_scores=True, **FIXED)
    guided = generator.generate([cond], dataclasses.replace(params, cfg_weight=weight))[0]
    reference_prompt = cond if weight == 1.0 else empty_condition_prompt(v, "audio")
    reference = generator.generate([reference_prompt], dataclasses.replace(params, cfg_weight=None))[0]
    assert torch.equal(guided.codes, reference.codes)
    for (_, cg), (_, cr) in zip(guided.scores, reference.scores):
        torch.testing.assert_close(cg, cr, atol=1e-4, rtol=1e-4)
    # And w = 3 really mixes: its logits differ from both.
    mixed = generator.generate([cond], dataclasses.replace(params, cfg_weight=3.0))[0]
    assert (mixed.scores[0][1] - reference.scores[0][1]).abs().max() > 1e-3


def test_text_reply_with_audio_in(model, generator):
    v = generator.vocab
    listener = AudioListener(model.config)
    t = np.arange(16000) / 16000
    msg, features, lengths = listener.message((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert int(lengths.sum()) == 25  # 1 s at 25 Hz
    prompt = build_prompt([msg, text_msg([7, 8, 9])], v, modality="text", audio_in_features=features,
                          audio_in_lengths=lengths)
    params = GenerationParams(text=SAMPLED, seed=3, max_new_tokens=10, max_audio_segments=0,
                              output_scores=True, cfg_weight=None)
    cached = generator.generate([prompt, build_prompt([text_msg([7])], v, modality="text")], params)
    full = generator.generate([prompt, build_prompt([text_msg([7])], v, modality="text")],
                              dataclasses.replace(params, kv_cache=False))
    for a, b in zip(cached, full):
        assert torch.equal(a.tokens, b.tokens)
        assert all(s.modality == "text" for s in a.segments)
    # The audio is really heard: silence instead of a tone changes the first logits.
    quiet, qf, ql = listener.message(np.zeros(16000, dtype=np.float32))
    silent = build_prompt([quiet, text_msg([7, 8, 9])], v, modality="text", audio_in_features=qf, audio_in_lengths=ql)
    other = generator.generate([silent], params)[0]
    assert (other.scores[0][0] - cached[0].scores[0][0]).abs().max() > 1e-4
    assert len(cached[0].tokens) <= 10


def test_text_limits_and_stop(generator):
    v = generator.vocab
    prompt = build_prompt([text_msg([1, 2])], v, modality="text")
    out = generator.generate([prompt], GenerationParams(text=SAMPLED, max_new_tokens=5, max_audio_segments=0,
                                                        cfg_weight=None, seed=1))[0]
    assert 1 <= len(out.tokens) <= 5
    assert not (out.tokens == v.audio_out).any() and not (out.tokens == v.modality("audio")).any()
    if out.finished:
        assert out.tokens[-1] == v.eos


def test_state_machine_switches_modality_and_flushes_the_delay(generator):
    """Drives the per-row state machine with fixed picks: text -> <|audio|> -> 3 frames ->
    model stops -> K-1 flush steps -> <|eot|> -> text again."""
    v, K = generator.vocab, generator.config.num_codebooks
    params = GenerationParams(max_audio_seconds=1.0)
    st = _Row(mode=TEXT)
    cells = list(range(10, 10 + K))

    def pick(text=0, cont=None, term=None):
        return [text, cont if cont is not None else v.audio_out, term if term is not None else v.eot] + cells

    cols = [generator._advance(st, pick(text=v.modality("audio")), params, 50)]
    assert st.mode == AUDIO
    for _ in range(3):
        cols.append(generator._advance(st, pick(), params, 50))
    cols.append(generator._advance(st, pick(cont=v.audio_flush), params, 50))  # the model ends the audio
    assert st.frames == 3
    while st.mode == AUDIO:
        cols.append(generator._advance(st, pick(), params, 50))
    assert cols[-1] == (v.eot, None) and st.mode == TEXT
    tokens = torch.tensor([c[0] for c in cols])
    codes = torch.tensor([c[1] if c[1] is not None else [v.code_empty] * K for c in cols]).T
    assert len(cols) == 1 + (3 + K - 1) + 1
    from megatron_ualm.inference import parse_response

    segs = parse_response(torch.cat([tokens, torch.tensor([v.role("assistant"), v.modality("text"), 5, 6, v.eos])]),
                          torch.cat([codes, torch.full((K, 5), v.code_empty)], dim=1), v, None)
    assert [s.modality for s in segs] == ["audio", "text"]
    assert segs[0].codes.shape == (K, 3) and torch.equal(segs[0].codes[:, 0], torch.tensor(cells))
    assert segs[1].text == [5, 6] and segs[1].terminator == "<|eos|>"


def test_cuda_graphs_and_static_cache_refuse_what_they_cannot_run(generator):
    prompt = [build_prompt([text_msg([1, 2, 3])], generator.vocab, modality="audio")]
    with pytest.raises(ValueError, match="GPU"):
        generator.generate(prompt, GenerationParams(cuda_graphs=True, **FIXED))
    with pytest.raises(ValueError, match="kv_cache=True"):
        GenerationParams(static_cache=True, kv_cache=False)
    # A decoder whose attention ignores explicit masks (TE's, built causal) refuses padded batches.
    from megatron_ualm.inference import Generator

    blind = Generator(generator.model)
    assert blind._masks_padding  # the local spec applies the mask
    blind._masks_padding = False
    with pytest.raises(ValueError, match="transformer_impl='local'"):
        blind.generate(prompt, GenerationParams(cfg_weight=3.0, **FIXED))
    blind.generate(prompt, GenerationParams(cfg_weight=None, **FIXED))  # one length, no CFG: no padding


def test_rng_fork_is_skipped_only_while_capturing(generator):
    from megatron.core import tensor_parallel

    from megatron_ualm.inference.static_cache import _no_rng_fork

    tracker = tensor_parallel.get_cuda_rng_tracker()
    with _no_rng_fork():
        assert "fork" in vars(tracker)  # overridden on the instance
        with tracker.fork():  # a null context: no RNG state is read or set
            pass
    assert "fork" not in vars(tracker)  # the tracker's own method again
