"""UALMDataset: packed rows against a slow reference, the over-long rule, CFG dropout, audio in."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.utils import Split

from megatron_ualm.codebooks.delay import revert_delay
from megatron_ualm.data.audio import AudioInConfig, pcm_to_float
from megatron_ualm.data.batch import collate_packed
from megatron_ualm.data.dataset import UALMDataset, UALMDatasetConfig, fit_to_length
from megatron_ualm.data.sequence import Message, build_sample
from megatron_ualm.data.shards import Segment, ShardReader, document_length

SEQ = 128


def first_shard(out: str) -> str:
    return os.path.dirname(sorted(glob.glob(os.path.join(out, "*-[0-9]*", "shard.json")))[0])


def make(path, vocab, seq=SEQ, p=0.0, num_samples=None, seed=3, audio_in=AudioInConfig(16, 2)):
    config = UALMDatasetConfig(random_seed=seed, sequence_length=seq, split="100,0,0", vocab=vocab,
                               audio_in=audio_in, cfg_condition_dropout=p, path_to_cache=None)
    reader = ShardReader(path)
    return UALMDataset(reader, path, np.arange(len(reader)), num_samples, Split.train, config)


def reference_messages(segments):
    """The sequence format's messages of a stored record, written out plainly."""
    out = []
    for s in segments:
        if s.kind == "text":
            out.append(Message(s.role, "text", text=s.data.tolist()))
        elif s.kind == "audio_out":
            out.append(Message(s.role, "audio", codes=torch.tensor(s.data, dtype=torch.long)))
        else:
            out.append(Message(s.role, "audio", audio_in_frames=-(-s.data.shape[0] // 640)))
    return out


@pytest.mark.parametrize("family", ["text", "generation"])
def test_rows_are_whole_documents_in_the_sequence_format(corpus, vocab, family):
    path = first_shard(corpus[family])
    ds, reader = make(path, vocab, seq=256), ShardReader(path)
    seen = []
    for i in range(len(ds)):
        row = ds[i]
        docs = ds.row_documents[ds.row_offsets[i]:ds.row_offsets[i + 1]].tolist()
        assert row["tokens"].numel() <= 257
        assert row["doc_lengths"].tolist() == [document_length(reader.document(d), 8) for d in docs]
        expected = [build_sample(reference_messages(reader.document(d)), vocab) for d in docs]
        assert torch.equal(row["tokens"], torch.cat([e.tokens for e in expected]))
        assert torch.equal(row["codes"], torch.cat([e.codes for e in expected], dim=1))
        assert torch.equal(row["text_target"], torch.cat([e.text_target for e in expected]))
        assert torch.equal(row["code_target"], torch.cat([e.code_target for e in expected], dim=1))
        seen += docs
    assert sorted(seen) == list(range(len(reader)))  # one epoch: every record exactly once


def test_packing_fills_rows(corpus, vocab):
    ds = make(first_shard(corpus["text"]), vocab)
    used = sum(int(ds[i]["tokens"].numel()) for i in range(len(ds)))
    assert used / (len(ds) * (SEQ + 1)) > 0.9


def test_collate_positions_mask_and_cu_seqlens_against_loops(corpus, vocab):
    ds = make(first_shard(corpus["text"]), vocab)
    items = [ds[i] for i in range(3)]
    batch = collate_packed(items, SEQ, vocab)
    starts = []
    for b, item in enumerate(items):
        doc_of = []
        for d, n in enumerate(item["doc_lengths"].tolist()):
            doc_of += [d] * n
        doc_of += [doc_of[-1]] * (SEQ + 1 - len(doc_of))  # padding joins the last document
        doc_of = doc_of[:SEQ]
        for i in range(SEQ):
            first = doc_of.index(doc_of[i])
            assert batch.position_ids[b, i] == i - first
            if i == first:
                starts.append(b * SEQ + i)
            for j in range(SEQ):
                assert bool(batch.attention_mask[b, 0, i, j]) == (j > i or doc_of[j] != doc_of[i])
            if i + 1 < SEQ and doc_of[i + 1] != doc_of[i]:
                assert batch.loss_mask[b, i] == 0  # never train on predicting the next document
    assert batch.cu_seqlens.tolist() == starts + [3 * SEQ]
    assert batch.tokens.shape == (3, SEQ) and batch.codes.shape == (3, 8, SEQ)
    assert torch.equal(batch.labels[:, :-1], batch.tokens[:, 1:])


def test_single_document_rows_need_no_mask(corpus, vocab):
    ds = make(first_shard(corpus["generation"]), vocab, seq=40)  # every record fills a row alone
    batch = collate_packed([ds[0], ds[1]], 40, vocab)
    assert batch.attention_mask is None and torch.equal(batch.position_ids[0], torch.arange(40))


def test_over_long_generation_is_cut_at_a_frame(vocab):
    codes = np.arange(8 * 30).reshape(8, 30) % 64
    doc = [Segment("user", "text", np.arange(5, dtype=np.int32), True), Segment("assistant", "audio_out", codes)]
    assert document_length(doc, 8) == 1 + 3 + 5 + 3 + 37
    fitted = fit_to_length(doc, 40, 8)
    assert document_length(fitted, 8) == 40 and fitted[1].data.shape == (8, 21)
    sample = build_sample(reference_messages(fitted), vocab)
    steps = (sample.tokens == vocab.audio_out) | (sample.tokens == vocab.audio_flush)
    delayed = sample.codes[:, steps]  # [K, T' + K - 1]
    assert torch.equal(revert_delay(delayed[None])[0], torch.tensor(codes[:, :21]))


def test_over_long_understanding_keeps_the_question(vocab):
    doc = [Segment("user", "audio_in", np.zeros(16000 * 3, np.int16)), Segment("user", "text", np.arange(4, dtype=np.int32)),
           Segment("assistant", "text", np.arange(6, dtype=np.int32))]
    fitted = fit_to_length(doc, 60, 8)
    assert [s.kind for s in fitted] == ["audio_in", "text", "text"] and document_length(fitted, 8) == 60
    assert fitted[0].data.shape[0] == fitted[0].units() * 640


def test_over_long_text_drops_messages_then_cuts_tokens(vocab):
    doc = [Segment("user", "text", np.arange(50, dtype=np.int32)), Segment("assistant", "text", np.arange(9, dtype=np.int32))]
    fitted = fit_to_length(doc, 30, 8)
    assert len(fitted) == 1 and fitted[0].data.tolist() == list(range(26))


def test_understanding_rows_over_long_records(corpus, vocab):
    ds = make(first_shard(corpus["understanding"]), vocab, seq=24)
    for i in range(len(ds)):
        row = ds[i]
        assert row["tokens"].numel() <= 25
        assert int(row["audio_in_lengths"].sum()) == int((row["tokens"] == vocab.audio_in).sum())


def test_cfg_dropout_rate_and_determinism(corpus, vocab):
    paths = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(corpus["generation"], "*-[0-9]*", "shard.json")))
    dropped = total = 0
    for path in paths:
        ds = make(path, vocab, seq=256, p=0.5)
        again = make(path, vocab, seq=256, p=0.5)
        never = make(path, vocab, seq=256, p=0.0)
        for i in range(len(ds)):
            row, plain = ds[i], never[i]
            assert torch.equal(row["tokens"], again[i]["tokens"])
            begin = 0
            for n, m in zip(row["doc_lengths"].tolist(), plain["doc_lengths"].tolist()):
                total += 1
                if n < m:  # <|bos|><|user|><|text|><|eos|>: the condition is empty
                    dropped += 1
                    assert row["tokens"][begin:begin + 4].tolist() == [
                        vocab.bos, vocab.role("user"), vocab.modality("text"), vocab.eos]
                begin += n
    assert total == 48 and 0.3 < dropped / total < 0.7


def test_audio_in_features_pcm_and_mel_shards_agree(corpus, vocab):
    from transformers import WhisperFeatureExtractor

    pcm = make(first_shard(corpus["understanding"]), vocab)
    mel = make(first_shard(corpus["understanding_mel"]), vocab)
    reader = ShardReader(first_shard(corpus["understanding"]))
    extractor = WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    for i in range(len(pcm)):
        a, b = pcm[i], mel[i]
        assert torch.equal(a["tokens"], b["tokens"])
        assert torch.equal(a["audio_in_features"], b["audio_in_features"])
        assert torch.equal(a["audio_in_lengths"], b["audio_in_lengths"])
        assert a["audio_in_features"].shape[1:] == (16, 200)
        assert int(a["audio_in_lengths"].sum()) == int((a["tokens"] == vocab.audio_in).sum())
    # The first window of record 0 against Whisper's own features.
    docs = pcm.row_documents[pcm.row_offsets[0]:pcm.row_offsets[1]].tolist()
    wave = pcm_to_float(reader.document(docs[0])[0].data)
    whisper = torch.from_numpy(extractor(wave[:32000], sampling_rate=16000, return_tensors="np")["input_features"][0])
    feats, n = pcm[0]["audio_in_features"][0], int(pcm[0]["audio_in_lengths"][0]) * 4
    assert torch.allclose(feats[:, :n], whisper[:, :n], atol=1e-5)
    assert torch.all(feats[:, n:] == max(-1.5, float(feats[:, :n].max()) - 2.0))


def test_mismatched_codec_is_rejected(corpus, vocab):
    from megatron_ualm.vocab import UALMVocab

    other = UALMVocab(vocab.text_vocab_size, vocab.vocab_size, 4, 64)
    with pytest.raises(ValueError, match="K=8 x card=64"):
        make(first_shard(corpus["generation"]), other)


@pytest.mark.parametrize("seconds", [0.01, 0.5, 1.3, 2.0, 3.7, 4.0])
def test_log_mel_matches_whisper_on_valid_frames(seconds):
    from transformers import WhisperFeatureExtractor

    from megatron_ualm.data.audio import LogMel

    rng = np.random.default_rng(int(seconds * 100))
    wave = (0.2 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    wave[-50:] *= 8  # a loud click at the very end: the clamp's maximum must still match
    extractor = WhisperFeatureExtractor(feature_size=16, chunk_length=2)
    config = AudioInConfig(16, 2)
    valid = LogMel(config).valid_windows(wave)
    assert [v.shape[1] // 4 for v in valid] == config.frames_per_window(wave.shape[0])
    for i, v in enumerate(valid):
        window = wave[i * 32000:(i + 1) * 32000]
        ref = extractor(window, sampling_rate=16000, padding="max_length", return_tensors="np")["input_features"][0]
        np.testing.assert_allclose(v, ref[:, : v.shape[1]], atol=2e-5)
