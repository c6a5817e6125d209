"""The pretraining blend: understanding / generation / text shards mixed by token counts.

The weight of a shard is ``tokens(shard) * upsample(family)``: each family contributes in
proportion to its tokens times its up-sampling factor (generation x2 by default, as in the
paper), and shards inside a family in proportion to their tokens. Mixing, per-shard sample
budgets and index caching are Megatron's ``BlendedMegatronDatasetBuilder`` /
``BlendedDataset`` (exact-proportion greedy blending, deterministic for a seed).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from megatron_ualm.data.dataset import UALMDataset, UALMDatasetConfig
from megatron_ualm.data.shards import FAMILIES, SIDECAR, read_sidecar

DEFAULT_UPSAMPLE = {"understanding": 1.0, "generation": 2.0, "text": 1.0}
BLEND_FORMAT = "ualm-blend"


@dataclass
class BlendPlan:
    """Shards, their families and weights.

    Attributes:
        shards: shard directories.
        families: family of each shard.
        samples: records per shard.
        tokens: sequence-format positions per shard.
        upsample: factor per family.
    """

    shards: list
    families: list
    samples: list
    tokens: list
    upsample: dict = field(default_factory=lambda: dict(DEFAULT_UPSAMPLE))

    @property
    def weights(self) -> list[float]:
        """Per-shard blend weights, normalised."""
        w = np.array([t * self.upsample[f] for t, f in zip(self.tokens, self.families)], dtype=np.float64)
        return (w / w.sum()).tolist()

    def family_table(self) -> list[dict]:
        """Per family: shards, samples, tokens, up-sampling, share of the mixture."""
        weights = self.weights
        rows = []
        for fam in FAMILIES:
            ids = [i for i, f in enumerate(self.families) if f == fam]
            if ids:
                rows.append({"family": fam, "shards": len(ids), "samples": sum(self.samples[i] for i in ids),
                             "tokens": sum(self.tokens[i] for i in ids), "upsample": self.upsample[fam],
                             "share": sum(weights[i] for i in ids)})
        return rows

    def to_json(self) -> dict:
        return {"format": BLEND_FORMAT, "version": 1, "upsample": self.upsample,
                "families": self.family_table(),
                "shards": [{"path": p, "family": f, "samples": s, "tokens": t, "weight": w}
                           for p, f, s, t, w in zip(self.shards, self.families, self.samples, self.tokens, self.weights)]}

    @classmethod
    def from_json(cls, blob: dict) -> "BlendPlan":
        if blob.get("format") != BLEND_FORMAT:
            raise ValueError(f"not a UALM blend file (format {blob.get('format')!r}, expected {BLEND_FORMAT!r})")
        s = blob["shards"]
        return cls([x["path"] for x in s], [x["family"] for x in s], [x["samples"] for x in s],
                   [x["tokens"] for x in s], dict(blob["upsample"]))

    def megatron_blend(self) -> tuple[list[str], list[float]]:
        """``BlendedMegatronDatasetConfig.blend``: (prefixes, weights)."""
        return list(self.shards), self.weights


def find_shards(paths: Sequence[str]) -> list[str]:
    """Shard directories under the given shard directories, output directories or globs."""
    found = []
    for p in paths:
        matches = sorted(glob.glob(p)) or [p]
        for m in matches:
            if os.path.isfile(os.path.join(m, SIDECAR)):
                found.append(os.path.abspath(m))
            else:
                found.extend(sorted(os.path.abspath(os.path.dirname(s)) for s in glob.glob(os.path.join(m, "*", SIDECAR))))
    if not found:
        raise ValueError(f"no UALM shards (directories with {SIDECAR}) found under {list(paths)}")
    return found


def plan_blend(shard_dirs: Sequence[str], upsample: Optional[dict] = None) -> BlendPlan:
    """Reads the sidecars and checks the shards agree on tokenizer and codec.

    Args:
        shard_dirs: shard directories.
        upsample: factor per family (missing families: ``DEFAULT_UPSAMPLE``).

    Raises:
        ValueError: empty shards, unknown family, or mixed tokenizers / codecs.
    """
    factors = {**DEFAULT_UPSAMPLE, **(upsample or {})}
    plan = BlendPlan([], [], [], [], factors)
    tokenizer = codec = None
    for d in shard_dirs:
        meta = read_sidecar(d)
        if meta["family"] not in FAMILIES:
            raise ValueError(f"{d}: family {meta['family']!r} is not one of {FAMILIES}")
        if meta["counts"]["samples"] == 0:
            continue  # every record was rejected; nothing to draw
        tok = meta["tokenizer"]["sha256"]
        if tokenizer is None:
            tokenizer = (tok, d)
        elif tok != tokenizer[0]:
            raise ValueError(f"{d} was tokenised with another tokenizer than {tokenizer[1]}; re-run its preprocessing")
        if meta.get("codec"):
            ident = {k: meta["codec"].get(k) for k in ("name", "num_codebooks", "codebook_size", "frame_rate", "sha256")}
            if codec is None:
                codec = (ident, d)
            elif ident != codec[0]:
                raise ValueError(f"{d} was encoded with codec {ident}, {codec[1]} with {codec[0]}")
        plan.shards.append(d)
        plan.families.append(meta["family"])
        plan.samples.append(meta["counts"]["samples"])
        plan.tokens.append(meta["counts"]["tokens"])
    if not plan.shards:
        raise ValueError("every shard is empty")
    return plan


def format_table(plan: BlendPlan) -> str:
    """The mixture table, one line per family plus a total."""
    rows = plan.family_table()
    lines = [f"{'family':<14}{'shards':>8}{'samples':>12}{'tokens':>15}{'upsample':>10}{'mixture %':>11}"]
    for r in rows:
        lines.append(f"{r['family']:<14}{r['shards']:>8}{r['samples']:>12,}{r['tokens']:>15,}"
                     f"{r['upsample']:>9g}x{100 * r['share']:>10.1f}")
    lines.append(f"{'total':<14}{sum(r['shards'] for r in rows):>8}{sum(r['samples'] for r in rows):>12,}"
                 f"{sum(r['tokens'] for r in rows):>15,}{'':>10}{100.0:>11.1f}")
    return "\n".join(lines)


def build_datasets(plan: BlendPlan, config_kwargs: dict, sizes: Sequence[Optional[int]]) -> list:
    """Builds the train / valid / test ``BlendedDataset``s of a plan.

    Args:
        plan: the blend.
        config_kwargs: ``UALMDatasetConfig`` fields (``random_seed``, ``sequence_length``,
            ``split``, ``vocab``, ``audio_in``, ``path_to_cache``, ...).
        sizes: rows wanted per split (train, valid, test); None counts as 0 (Megatron needs a
            size for every split of a weighted blend).

    Returns:
        ``[train, valid, test]`` (None for an empty split).
    """
    config = UALMDatasetConfig(blend=plan.megatron_blend(), **config_kwargs)
    sizes = [int(n or 0) for n in sizes]
    return BlendedMegatronDatasetBuilder(UALMDataset, sizes, lambda: True, config).build()


def load_plan(path: str) -> BlendPlan:
    """Reads a blend file written by ``tools/build_blend.py``."""
    with open(path) as f:
        return BlendPlan.from_json(json.load(f))


def build_data_loader(dataset, seq_length: int, vocab, micro_batch_size: int, consumed_samples: int = 0,
                      data_parallel_rank: int = 0, data_parallel_size: int = 1, num_workers: int = 0,
                      attention_mask: bool = True, collate_fn=None, seed: int = 0):
    """A data loader over a (blended) dataset that starts after ``consumed_samples``.

    Uses Megatron's ``MegatronPretrainingSampler``: sample ``i`` of the global order goes to
    the same step and rank whatever the restart point, so a resumed run neither repeats nor
    skips a sample. ``collate_fn`` replaces the default ``collate_packed``. The loader has its
    own seeded generator, which keeps its base-seed draw off the global RNG (on CPU also the
    dropout RNG), so an exact resume does not depend on when loaders were created.
    """
    from functools import partial

    import torch
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    from megatron_ualm.data.batch import collate_packed

    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size)
    collate_fn = collate_fn or partial(collate_packed, seq_length=seq_length, vocab=vocab, attention_mask=attention_mask)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
        collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available())
