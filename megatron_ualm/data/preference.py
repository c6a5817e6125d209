"""Preference pairs for DPO: the manifest, the paired shards, the dataset and the micro-batch.

Manifest (JSONL lines or Parquet rows), one pair per record::

    {"prompt": "a dog barks twice in a quiet room",                    # or a list of messages
     "chosen":   {"audio": "gen/0007_3.wav"},                          # or {"codes": [[...]]},
     "rejected": {"codes": [[12, 7, ...], ...]},                       # "text", or a message list
     "id": "0007", "scores": {"clap": [0.51, 0.32]}}                    # optional, not stored

- ``prompt``: the conversation before the response, a string (one user text message) or a
  list of chat messages (``megatron_ualm.data.chat`` schema: text, audio in, audio out as
  clip or codes; e.g. ``[{"role": "system", ...}, {"role": "user", "content": ...},
  {"role": "assistant", "content": "<rich caption>"}]`` to prefer the audio after a plan).
  Prompt messages carry no loss.
- ``chosen`` / ``rejected``: the responses, each a string (assistant text), one message
  object (``{"content"}``, ``{"audio"}`` or ``{"codes"}``; role assistant) or a list of
  assistant messages (e.g. caption then audio). Every response message is trained.

Bad records are named and skipped (``--strict`` stops): a missing or empty side, chosen
identical to rejected (same messages, same text, same clip or codes), audio that is missing
or undecodable, codes of the wrong shape, non-assistant response messages.

Stored layout (family ``preference``): one document per pair holding two complete
conversations, ``prompt + chosen`` then ``prompt + rejected``, with the per-message loss bit
(``shards.encode_mode``) on the response messages only. The second conversation starts at the
first message without loss that follows a message with loss; ``split_pair`` finds it and
checks that both halves hold the same prompt. Storing the prompt twice keeps every document a
valid conversation for the shard tools, at the price of the prompt's bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_ualm.data.batch import UALMBatch, collate_packed
from megatron_ualm.data.chat import ChatConverter, Turn, message_turn
from megatron_ualm.data.dataset import UALMDataset, UALMDatasetConfig
from megatron_ualm.data.errors import RecordError
from megatron_ualm.data.shards import Segment, ShardError, ShardReader
from megatron_ualm.vocab import UALMVocab


# ---------------------------------------------------------------------------------------------
# Manifest records -> paired documents.

def _response_turns(value: Any, side: str) -> list[Turn]:
    if value is None:
        raise RecordError("is missing (give the response as text, a message or a list of assistant messages)", side)
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RecordError("must be text, a message object or a non-empty list of messages", side)
    turns = [message_turn(m, f"{side}[{i}]" if len(value) > 1 else side, default_role="assistant")
             for i, m in enumerate(value)]
    for t in turns:
        if t.role != "assistant":
            raise RecordError(f"is a {t.role} message; a response holds assistant messages only", t.field)
        if t.loss is False:
            raise RecordError("says loss false, but every response message is scored by DPO", t.field)
    return turns


def _same(a: list[Segment], b: list[Segment]) -> bool:
    return len(a) == len(b) and all(x.role == y.role and x.kind == y.kind and x.data.shape == y.data.shape
                                     and np.array_equal(x.data, y.data) for x, y in zip(a, b))


class PreferenceConverter(ChatConverter):
    """Preference records -> one paired document each (``preference`` family).

    Arguments as ``ChatConverter`` (codec or precomputed codes identity, audio in, roots);
    loss overrides do not apply (the response is what DPO scores).
    """

    family = "preference"

    def convert(self, rec: dict) -> list[Segment]:
        prompt_value = rec.get("prompt")
        if isinstance(prompt_value, str):
            prompt_value = [{"role": "user", "content": prompt_value}]
        if not isinstance(prompt_value, list) or not prompt_value:
            raise RecordError("must be text or a non-empty list of messages (the conversation before the response)",
                              "prompt")
        prompt_turns = [message_turn(m, f"prompt[{i}]") for i, m in enumerate(prompt_value)]
        for t in prompt_turns:
            if t.loss:
                raise RecordError("says loss true, but a DPO prompt is context only", t.field)
        sides = [_response_turns(rec.get(side), side) for side in ("chosen", "rejected")]
        prompt = [self.segment(t) for t in prompt_turns]
        chosen, rejected = ([self.segment(t) for t in turns] for turns in sides)
        if _same(chosen, rejected):
            raise RecordError("is identical to chosen (a pair needs two different responses)", "rejected")
        for seg in prompt:
            seg.loss = False
        for seg in chosen + rejected:
            seg.loss = True
        # The prompt's messages appear twice; the runner stores each one where it appears.
        return prompt + chosen + [dataclasses.replace(s) for s in prompt] + rejected


def split_pair(segments: list[Segment], where: str) -> tuple[list[Segment], list[Segment], list[Segment]]:
    """``(prompt, chosen, rejected)`` of a stored pair document (layout: module docstring).

    Raises:
        ShardError: the document is not a pair (``where`` names the shard and record).
    """
    loss = [bool(s.loss) for s in segments]
    starts = [i for i in range(1, len(segments)) if loss[i - 1] and not loss[i]]
    p = loss.index(True) if True in loss else len(loss)
    if len(starts) != 1 or p == 0:
        raise ShardError(f"{where} is not a preference pair: expected prompt (no loss) + chosen (loss) + prompt + "
                         f"rejected (loss), got loss flags {[int(x) for x in loss]}")
    b = starts[0]
    first, second = segments[:b], segments[b:]
    if len(second) <= p or any(loss[b:b + p]) or not all(loss[b + p:]) or not _same(first[:p], second[:p]):
        raise ShardError(f"{where} is not a preference pair: its two conversations do not share the prompt")
    return first[:p], first[p:], second[p:]


# ---------------------------------------------------------------------------------------------
# Micro-batches.

@dataclass
class PairBatch:
    """A micro-batch of ``P`` preference pairs.

    Attributes:
        rows: ``2P`` rows; row ``2i`` is pair ``i``'s chosen conversation, ``2i + 1`` its
            rejected one. Loss masks select the responses.
        reference: ``[P, 2, 1 + K]`` float32 reference log-probability sums per stream
            (stream 0, then each codebook) of the chosen / rejected response; None until
            attached (and on pipeline stages that do not compute the loss).
        keys: ``(shard index in the blend plan, record)`` of each pair, for stored reference
            log-probabilities; None for pairs that are not from shards.
    """

    rows: UALMBatch
    reference: Optional[torch.Tensor] = None
    keys: Optional[list] = None

    @property
    def num_pairs(self) -> int:
        return self.rows.tokens.shape[0] // 2

    def to(self, device) -> "PairBatch":
        """A copy with every tensor on ``device``."""
        ref = None if self.reference is None else self.reference.to(device)
        return dataclasses.replace(self, rows=self.rows.to(device), reference=ref)


def collate_pairs(items: Sequence[dict], seq_length: int, vocab: UALMVocab) -> PairBatch:
    """Batches pair items (``PreferenceDataset`` items, or ones built the same way).

    Args:
        items: dicts with ``chosen`` and ``rejected`` (``UALMDataset`` row items: ``tokens``,
            ``codes``, ``text_target``, ``code_target``, ``doc_lengths``, ``audio_in_features``,
            ``audio_in_lengths``), and optionally ``key`` and ``reference`` (``[2, 1 + K]``).
        seq_length: s.
        vocab: pad ids.

    Returns:
        The batch; ``reference`` / ``keys`` are set when every item has one.
    """
    rows = [row for it in items for row in (it["chosen"], it["rejected"])]
    batch = collate_packed(rows, seq_length, vocab, attention_mask=True)
    refs = [it.get("reference") for it in items]
    reference = torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in refs]) if all(
        r is not None for r in refs) else None
    keys = [it["key"] for it in items] if all("key" in it for it in items) else None
    return PairBatch(batch, reference, keys)


class PairCollate:
    """``collate_pairs`` with the rows counted as the ``preference`` family (for the metrics).

    Args:
        seq_length: s.
        vocab: pad ids.
    """

    def __init__(self, seq_length: int, vocab: UALMVocab):
        self.seq_length, self.vocab = seq_length, vocab

    def __call__(self, items: Sequence[dict]) -> PairBatch:
        import collections

        batch = collate_pairs(items, self.seq_length, self.vocab)
        batch.rows.family_counts = collections.Counter({"preference": 2 * len(items)})
        return batch


# ---------------------------------------------------------------------------------------------
# The dataset.

class PreferenceDataset(UALMDataset):
    """Preference pairs of one shard, a Megatron dataset (``blend.build_datasets`` builds it
    with ``dataset_cls=PreferenceDataset``).

    Item ``i`` is a pair of this split in a seeded order (a new permutation per epoch), so an
    item depends on ``i`` alone and a resumed run continues exactly. Each side is one row
    ``prompt + response`` laid out by ``UALMDataset.row_item`` (an over-long side is shortened
    by the same rule as packed rows); no CFG dropout (DPO compares fixed prompts).

    Args:
        as ``UALMDataset`` (``config.cfg_condition_dropout`` must be 0).
    """

    reads_pairs = True

    def __init__(self, dataset: ShardReader, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: UALMDatasetConfig) -> None:
        MegatronDataset.__init__(self, dataset, dataset_path, indices, num_samples, index_split, config)
        if config.cfg_condition_dropout:
            raise ValueError(f"cfg_condition_dropout={config.cfg_condition_dropout}: DPO pairs keep their prompts; "
                             "set it to 0")
        self.vocab: UALMVocab = config.vocab
        self.capacity = config.sequence_length + 1
        self._check_compatible()
        self._log_mel = None
        n = len(indices)
        if n == 0:
            raise ValueError(f"{dataset_path}: the {index_split.name} split holds no pairs")
        epochs = max(1, -(-int(num_samples or 0) // n))
        rng = np.random.RandomState(config.random_seed)
        self.order = np.concatenate([rng.permutation(n) for _ in range(epochs)])

    def __len__(self) -> int:
        return len(self.order)

    @property
    def tokens_per_row(self) -> float:
        """Mean positions of a pair (both rows; the blend weighs shards by tokens per item)."""
        return float(self.dataset.document_lengths()[self.indices].mean())

    def pair(self, record: int) -> dict:
        """The item of the shard's record ``record`` (``chosen``, ``rejected``, ``key``)."""
        where = f"{self.dataset_path} record {record}"
        prompt, chosen, rejected = split_pair(self.dataset.document(record), where)
        return {"chosen": self.row_item([prompt + chosen]), "rejected": self.row_item([prompt + rejected]),
                "key": (self.shard_index, record)}

    def __getitem__(self, idx: int) -> dict:
        item = self.pair(int(self.indices[self.order[idx]]))
        return item if self.shard_index is None else {"dataset_id": self.shard_index, **item}
