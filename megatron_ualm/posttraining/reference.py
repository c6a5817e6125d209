"""Reference log-probabilities for DPO, from one of two sources.

``precomputed`` (the default of ``python -m megatron_ualm.dpo``): before the first step, one
forward-only pass of the starting model (the policy at iteration 0, so no second model is
ever built) scores every pair of the blend's shards, under the run's TP / PP / DP, and stores
per-stream log-probability sums beside the run::

    <dir>/reference.json      format, version, seq_length, K, the reference checkpoint, and per
                              shard its path, run key, pairs and array file
    <dir>/shard-00000.npy     float32 [pairs, 2 (chosen, rejected), 1 + K] per shard of the plan

The arrays are written first and ``reference.json`` last (each under a temporary name, then
renamed), so a store is complete when its ``reference.json`` exists. A resumed run reads it.

``model``: a frozen copy of the reference checkpoint is held beside the policy (same TP / PP /
virtual stages, no gradients, not in the optimizer or the checkpoints) and scores each
step's micro-batches, forward only, before the policy's step.

Both attach ``[P, 2, 1 + K]`` tensors to the ``PairBatch`` objects of a step, before Megatron's
schedule runs (``posttraining.dpo_training.ReferenceLogProbs``, a training-loop extension).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_ualm.files import atomic_file, atomic_json
from megatron_ualm.posttraining.dpo_loss import score_batches

STORE_FORMAT = "ualm-reference-logps"
STORE_VERSION = 1
STORE_META = "reference.json"


def store_meta(plan, seq_length: int, num_codebooks: int, reference: str) -> dict:
    """What a store must hold for this run (compared with a store found on disk)."""
    from megatron_ualm.data.shards import read_sidecar

    shards = [{"path": os.path.abspath(p), "run_key": read_sidecar(p).get("run_key"), "pairs": int(n),
               "file": f"shard-{i:05d}.npy"} for i, (p, n) in enumerate(zip(plan.shards, plan.samples))]
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "seq_length": int(seq_length),
            "num_codebooks": int(num_codebooks), "reference": reference, "shards": shards}


def _differences(found: dict, expected: dict) -> list[str]:
    out = [f"{k} {found.get(k)!r} (stored) vs {expected[k]!r} (this run)"
           for k in ("format", "version", "seq_length", "num_codebooks", "reference") if found.get(k) != expected[k]]
    if found.get("shards") != expected["shards"]:
        out.append("the shards (paths, run keys or pair counts) differ from the blend's")
    return out


class ReferenceStore:
    """Stored reference log-probabilities of every pair of a blend plan.

    Args:
        directory: the store directory.
        meta: its ``reference.json``.
        arrays: per shard of the plan, ``[pairs, 2, 1 + K]`` float32.
    """

    def __init__(self, directory: str, meta: dict, arrays: Sequence[np.ndarray]):
        self.directory, self.meta, self.arrays = directory, meta, list(arrays)

    @classmethod
    def load(cls, directory: str, expected: dict) -> Optional["ReferenceStore"]:
        """The store in ``directory``, or None when there is none (no ``reference.json``).

        Raises:
            ValueError: the store was computed for other pairs, length or reference model.
        """
        path = os.path.join(directory, STORE_META)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            meta = json.load(f)
        diffs = _differences(meta, expected)
        if diffs:
            raise ValueError(f"reference log-probs in {directory} do not belong to this run: " + "; ".join(diffs)
                             + ". Give another --reference-logps directory (or delete this one to recompute it)")
        arrays = []
        for shard in meta["shards"]:
            a = np.load(os.path.join(directory, shard["file"]))
            want = (shard["pairs"], 2, 1 + meta["num_codebooks"])
            if a.shape != want:
                raise ValueError(f"{os.path.join(directory, shard['file'])} holds {a.shape}, expected {want}; delete "
                                 f"{directory} to recompute it")
            arrays.append(a)
        return cls(directory, meta, arrays)

    @staticmethod
    def write(directory: str, meta: dict, arrays: Sequence[np.ndarray]) -> None:
        """Writes the arrays, then ``reference.json`` (each atomically)."""
        os.makedirs(directory, exist_ok=True)
        for shard, array in zip(meta["shards"], arrays):
            with atomic_file(os.path.join(directory, shard["file"])) as tmp:
                np.save(tmp, np.asarray(array, dtype=np.float32))
        atomic_json(os.path.join(directory, STORE_META), meta)

    def lookup(self, keys: Sequence[tuple]) -> torch.Tensor:
        """``[P, 2, 1 + K]`` of the pairs ``(shard index, record)``."""
        return torch.from_numpy(np.stack([self.arrays[int(i)][int(r)] for i, r in keys]))


def score_all_pairs(model, datasets: Sequence, seq_length: int, rows_per_batch: int,
                    batches_per_call: int = 8) -> Optional[list[np.ndarray]]:
    """The reference pass: per-stream log-prob sums of every pair of ``datasets``.

    Every rank of the job calls it. Pairs are dealt to the data-parallel ranks in turn; each
    runs micro-batches of ``rows_per_batch`` rows (the last padded with repeats) through the
    model's forward-only schedule; the sums are summed over the data-parallel group.

    Args:
        model: this rank's model chunk(s), as Megatron's loop holds them.
        datasets: one ``PreferenceDataset`` per shard of the plan, over all its records, with
            ``shard_index`` set.
        seq_length: s.
        rows_per_batch: rows per micro-batch (two per pair).
        batches_per_call: micro-batches per schedule call.

    Returns:
        On the last pipeline stage, per shard ``[pairs, 2, 1 + K]`` float32; None elsewhere.
    """
    from megatron.core import parallel_state
    from megatron.training.utils import print_rank_0

    from megatron_ualm.data.preference import collate_pairs

    keys = [(i, r) for i, ds in enumerate(datasets) for r in range(len(ds.dataset))]
    offsets = np.cumsum([0] + [len(ds.dataset) for ds in datasets])
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = keys[rank::dp]
    filler = (mine or keys)[-1]  # pads the last micro-batch (and keeps a rank without pairs in step)
    per_batch = rows_per_batch // 2
    steps = math.ceil(math.ceil(len(keys) / dp) / per_batch)
    vocab = datasets[0].vocab
    K = vocab.num_codebooks
    total = torch.zeros(len(keys), 2, 1 + K, dtype=torch.float64)
    last = parallel_state.is_pipeline_last_stage()
    for first in range(0, steps, batches_per_call):
        real = [mine[m * per_batch:(m + 1) * per_batch] for m in range(first, min(steps, first + batches_per_call))]
        batches = [collate_pairs([datasets[i].pair(r) for i, r in ks + [filler] * (per_batch - len(ks))],
                                 seq_length, vocab) for ks in real]
        scores = score_batches(model, batches, seq_length)
        if last:
            for ks, s in zip(real, scores):
                for j, (i, r) in enumerate(ks):
                    total[offsets[i] + r] = s.view(per_batch, 2, 1 + K)[j].double()
        print_rank_0(f"> reference pass: {min(steps, first + batches_per_call)} of {steps} micro-batches per "
                     f"data-parallel rank ({len(keys)} pairs)")
    if dp > 1:
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"  # NCCL reduces device tensors
        on_device = total.to(device)
        torch.distributed.all_reduce(on_device, group=parallel_state.get_data_parallel_group())
        total = on_device.cpu()
    if not last:
        return None
    return [total[offsets[i]:offsets[i + 1]].float().numpy() for i in range(len(datasets))]


class FrozenReference:
    """A frozen reference model beside the policy: same config, TP / PP and virtual stages.

    Args:
        config: the run's model config.
        checkpoint: the reference weights (a ``--save`` directory or an iteration folder).
        vp_size: virtual pipeline stages per rank (None: one chunk).
    """

    def __init__(self, config, checkpoint: str, vp_size: Optional[int] = None):
        from megatron.core import parallel_state
        from megatron.core.transformer.module import Float16Module

        from megatron_ualm.inference.checkpoint import load_checkpoint
        from megatron_ualm.models.ualm_model import UALMModel

        self.chunks = []
        for vp in range(vp_size or 1):
            stage = vp if vp_size else None
            model = UALMModel(config, pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                              post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                              vp_stage=stage)
            if torch.cuda.is_available():
                model.cuda(torch.cuda.current_device())
            load_checkpoint(model, checkpoint)
            for p in model.parameters():
                p.requires_grad_(False)
            if config.fp16 or config.bf16:
                model = Float16Module(config, model)  # the policy's wrapper: the same input/output casts
            self.chunks.append(model.eval())

    def score(self, batches: Sequence, seq_length: int) -> Optional[list]:
        """Per-stream sums ``[rows, 1 + K]`` per batch on the last stage (None elsewhere)."""
        return score_batches(self.chunks, list(batches), seq_length)


class ReferenceSource:
    """Attaches reference log-probabilities to each step's pair micro-batches.

    Args:
        mode: ``precomputed`` or ``model``.
        store_dir: the store directory (``precomputed``).
        expected_meta: ``store_meta`` of this run (``precomputed``).
        pass_datasets: builds the per-shard datasets of the reference pass (``precomputed``).
        frozen: builds the ``FrozenReference`` (``model``).
        allow_pass: whether the pass may run (False for a resumed run: the policy is no
            longer the reference).
    """

    def __init__(self, mode: str, store_dir: Optional[str] = None, expected_meta: Optional[dict] = None,
                 pass_datasets=None, frozen=None, allow_pass: bool = True):
        if mode not in ("precomputed", "model"):
            raise ValueError(f"reference mode {mode!r}: choose precomputed or model")
        self.mode, self.store_dir, self.expected_meta = mode, store_dir, expected_meta
        self._pass_datasets, self._frozen_factory, self.allow_pass = pass_datasets, frozen, allow_pass
        self.store: Optional[ReferenceStore] = None
        self.frozen: Optional[FrozenReference] = None

    def _ensure_store(self, model, seq_length: int, rows: int) -> ReferenceStore:
        from megatron.core import parallel_state

        store = ReferenceStore.load(self.store_dir, self.expected_meta)
        if store is None:
            if not self.allow_pass:
                raise RuntimeError(f"{self.store_dir} holds no reference log-probs, and a resumed run cannot compute "
                                   "them (its policy is no longer the reference)")
            arrays = score_all_pairs(model, self._pass_datasets(), seq_length, rows)
            writer = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                      and parallel_state.get_data_parallel_rank() == 0)
            if writer:
                ReferenceStore.write(self.store_dir, self.expected_meta, arrays)
            torch.distributed.barrier()
            store = ReferenceStore.load(self.store_dir, self.expected_meta)
            if store is None:
                raise RuntimeError(f"{self.store_dir}/{STORE_META} is not visible on every rank: --reference-logps "
                                   "must be a directory all nodes share")
        return store

    def attach(self, batches_per_chunk: list[list], model, seq_length: int, rows: int) -> None:
        """Sets ``reference`` on the batches (one list per model chunk, same pairs in each)."""
        from megatron.core import parallel_state

        if self.mode == "precomputed":
            if self.store is None:
                self.store = self._ensure_store(model, seq_length, rows)
            for batches in batches_per_chunk:
                for b in batches:
                    b.reference = self.store.lookup(b.keys)
            return
        if self.frozen is None:
            self.frozen = self._frozen_factory()
        scores = self.frozen.score(batches_per_chunk[0], seq_length)
        if parallel_state.is_pipeline_last_stage():
            for batches in batches_per_chunk:
                for b, s in zip(batches, scores):
                    b.reference = s.view(b.num_pairs, 2, -1)

