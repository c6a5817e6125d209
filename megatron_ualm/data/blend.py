"""The pretraining blend: understanding / generation / text shards mixed by token counts.

Shares. A shard's share is ``tokens(shard) * upsample(family)``, normalised: each family
contributes in proportion to its tokens times its up-sampling factor (generation x2 by
default, as in the paper), and shards inside a family in proportion to their tokens. A share
is a share of *trained tokens* (the non-padding positions of the packed rows). Rows differ in
fullness (a row holding one long generation record leaves more of it empty than a row of
short text records), so each shard's rows are drawn with weight ``share / tokens per packed
row`` (the mean over one epoch of the shard's packed rows): the tokens, not the rows, follow
the shares.

Splits. The train / valid / test split (``98,1,1``) cuts each shard's records by position,
as Megatron does. A shard too small to give a split a record contributes nothing to that
split, and the split's weights are renormalised over the shards that have records in it. A
split that no shard has a record in is None (Megatron then skips evaluation), with a
warning; only a train split that rows are asked of and no shard can fill is an error.

Mixing and index caching are Megatron's ``BlendedDataset`` (exact-proportion greedy
blending, deterministic for a seed) over one ``UALMDataset`` per shard and split.
"""

from __future__ import annotations

import atexit
import glob
import json
import logging
import math
import os
import signal
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.utils import Split
from megatron.core.utils import log_single_rank

from megatron_ualm.data.families import DEFAULT_UPSAMPLE
from megatron_ualm.data.dataset import UALMDataset, UALMDatasetConfig
from megatron_ualm.data.shards import (FAMILIES, SIDECAR, ShardError, ShardReader, check_shard, read_sidecar,
                                       shard_layout)
from megatron_ualm.vocab import check_layouts, layout_fingerprint

logger = logging.getLogger(__name__)

BLEND_FORMAT = "ualm-blend"


@dataclass
class BlendPlan:
    """Shards, their families and token shares.

    Attributes:
        shards: shard directories.
        families: family of each shard.
        samples: records per shard.
        tokens: sequence-format positions per shard.
        upsample: factor per family.
        vocab_layout: the token-id layout the shards share (``megatron_ualm.vocab.vocab_layout``:
            tokenizer, K and card where known), for comparison with a checkpoint.
    """

    shards: list
    families: list
    samples: list
    tokens: list
    upsample: dict = field(default_factory=lambda: dict(DEFAULT_UPSAMPLE))
    vocab_layout: Optional[dict] = None

    @property
    def weights(self) -> list[float]:
        """Per-shard shares of the trained tokens, normalised."""
        w = np.array([t * self.upsample[f] for t, f in zip(self.tokens, self.families)], dtype=np.float64)
        return (w / w.sum()).tolist()

    def family_table(self) -> list[dict]:
        """Per family: shards, samples, tokens, up-sampling, share of the trained tokens."""
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
                "vocab": self.vocab_layout,
                "vocab_fingerprint": layout_fingerprint(self.vocab_layout) if self.vocab_layout else None,
                "families": self.family_table(),
                "shards": [{"path": p, "family": f, "samples": s, "tokens": t, "weight": w}
                           for p, f, s, t, w in zip(self.shards, self.families, self.samples, self.tokens, self.weights)]}

    @classmethod
    def from_json(cls, blob: dict) -> "BlendPlan":
        """The plan of a blend file's JSON.

        Raises:
            ValueError: not a blend, or a field missing or of the wrong type (named).
        """
        if not isinstance(blob, dict) or blob.get("format") != BLEND_FORMAT:
            found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
            raise ValueError(f"not a UALM blend file (format {found!r}, expected {BLEND_FORMAT!r})")
        shards = blob.get("shards")
        if not isinstance(shards, list) or not shards:
            raise ValueError(f"'shards' must be a non-empty list of shard entries, got {shards!r:.80}")
        for i, entry in enumerate(shards):
            if not isinstance(entry, dict):
                raise ValueError(f"shards[{i}] must be an object with path, family, samples, tokens")
            for key, kind in (("path", str), ("family", str), ("samples", int), ("tokens", int)):
                value = entry.get(key)
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise ValueError(f"shards[{i}].{key} must be a{'n' if kind is int else ''} "
                                     f"{kind.__name__}, got {value!r}")
            if entry["family"] not in FAMILIES:
                raise ValueError(f"shards[{i}].family {entry['family']!r} is not one of {FAMILIES}")
        upsample = blob.get("upsample")
        if not isinstance(upsample, dict) or not all(
                isinstance(upsample.get(f), (int, float)) and upsample[f] > 0 for f in {e["family"] for e in shards}):
            raise ValueError(f"'upsample' must map each family to a factor > 0, got {upsample!r}")
        layout = blob.get("vocab")
        if layout is not None and not isinstance(layout, dict):
            raise ValueError(f"'vocab' must be a token-id layout object, got {layout!r:.80}")
        return cls([x["path"] for x in shards], [x["family"] for x in shards], [x["samples"] for x in shards],
                   [x["tokens"] for x in shards], dict(upsample), layout)

    def megatron_blend(self) -> tuple[list[str], list[float]]:
        """``BlendedMegatronDatasetConfig.blend``: (prefixes, token shares)."""
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


def _one_error(errors: list, total: int) -> ShardError:
    """One error for every damaged shard: the first shown, all problems kept."""
    if len(errors) == 1:
        return errors[0]
    return ShardError(f"{len(errors)} of {total} shards are damaged; the first: {errors[0]}",
                      [p for err in errors for p in err.problems])


def _checked_sidecars(shard_dirs: Sequence[str]) -> list[dict]:
    """``check_shard`` of every shard; raises one ``ShardError`` for all that fail."""
    metas, errors = [], []
    for d in shard_dirs:
        try:
            metas.append(check_shard(d))
        except ShardError as err:
            errors.append(err)
    if errors:
        raise _one_error(errors, len(shard_dirs))
    return metas


_REBUILD = "Rebuild the shards with one tokenizer and one codec (tools/preprocess_*), then build_blend again."


def shared_layout(named_layouts: Sequence[tuple[str, dict]]) -> Optional[dict]:
    """The token-id layout of shards that must share one, or None for no shards.

    Every distinct layout is checked against the others (``check_layouts``: a mismatch names
    both shards); the shared layout takes the tokenizer, K and card from the shards that know
    them (text shards have no K).

    Args:
        named_layouts: ``(shard directory, layout)`` pairs.

    Raises:
        VocabMismatch: two shards with layouts that cannot be used together.
    """
    distinct: dict[str, tuple[str, dict]] = {}
    for path, layout in named_layouts:
        key = layout_fingerprint(layout)
        if key not in distinct:
            for other_path, other in distinct.values():
                check_layouts(other, f"shard {other_path}", layout, f"shard {path}", hint=_REBUILD)
            distinct[key] = (path, layout)
    layouts = [layout for _, layout in distinct.values()]
    if not layouts:
        return None
    merged = dict(layouts[0])
    for key in ("tokenizer", "num_codebooks", "codebook_size"):
        merged[key] = next((layout[key] for layout in layouts if layout.get(key) is not None), None)
    merged["special_tokens"] = max((layout["special_tokens"] for layout in layouts), key=len)  # append-only
    return merged


def plan_blend(shard_dirs: Sequence[str], upsample: Optional[dict] = None) -> BlendPlan:
    """Checks the shards and plans their blend from the sidecars.

    Each shard is checked (``check_shard``: files, index against data, sidecar counts against
    the index), and all must share one token-id layout and codec.

    Args:
        shard_dirs: shard directories.
        upsample: factor per family (missing families: ``DEFAULT_UPSAMPLE``).

    Raises:
        ShardError: damaged shards (each named, with the file at fault).
        VocabMismatch: shards of different tokenizers / codebook layouts (both named).
        ValueError: an unknown family, mixed codecs, or every shard empty.
    """
    factors = {**DEFAULT_UPSAMPLE, **(upsample or {})}
    plan = BlendPlan([], [], [], [], factors)
    codec = None
    layouts = []
    for d, meta in zip(shard_dirs, _checked_sidecars(shard_dirs)):
        if meta["family"] not in FAMILIES:
            raise ValueError(f"{d}: family {meta['family']!r} is not one of {FAMILIES}")
        if meta["counts"]["samples"] == 0:
            continue  # every record was rejected; nothing to draw
        layouts.append((d, shard_layout(meta)))
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
        rejected = sorted({os.path.join(os.path.dirname(os.path.abspath(d)), "*.rejected.jsonl") for d in shard_dirs})
        raise ValueError(f"every shard is empty ({len(shard_dirs)}): preprocessing kept no record (empty inputs, or "
                         f"every record rejected: see {', '.join(rejected)})")
    plan.vocab_layout = shared_layout(layouts)
    return plan


def check_shards(plan: BlendPlan) -> None:
    """Checks a plan's shards before training (cheap: sidecars and ``.idx`` files, no data scan).

    Each shard as ``build_blend`` checked it (``check_shard``), still holding the family,
    samples and tokens the blend recorded (a shard rewritten since would change the weights),
    with the blend's token-id layout.

    Raises:
        ShardError: damaged or changed shards, each named with the file at fault.
        VocabMismatch: a shard's layout differs from the blend's.
    """
    errors = []
    for path, family, samples, tokens in zip(plan.shards, plan.families, plan.samples, plan.tokens):
        try:
            meta = check_shard(path)
        except ShardError as err:
            errors.append(err)
            continue
        held = (meta["family"], meta["counts"]["samples"], meta["counts"]["tokens"])
        if held != (family, samples, tokens):
            errors.append(ShardError(
                f"{os.path.join(path, SIDECAR)}: the shard holds {held[0]} data of {held[1]} samples / {held[2]} "
                f"tokens, the blend recorded {family} / {samples} / {tokens}; the shard changed after the blend was "
                "built: rerun tools/build_blend.py"))
            continue
        check_layouts(plan.vocab_layout, "the blend", shard_layout(meta), f"shard {path}", hint=_REBUILD)
    if errors:
        raise _one_error(errors, len(plan.shards))


def format_table(plan: BlendPlan) -> str:
    """The mixture table, one line per family plus a total; shares are of the trained tokens."""
    rows = plan.family_table()
    lines = [f"{'family':<14}{'shards':>8}{'samples':>12}{'tokens':>15}{'upsample':>10}{'tokens %':>11}"]
    for r in rows:
        lines.append(f"{r['family']:<14}{r['shards']:>8}{r['samples']:>12,}{r['tokens']:>15,}"
                     f"{r['upsample']:>9g}x{100 * r['share']:>10.1f}")
    lines.append(f"{'total':<14}{sum(r['shards'] for r in rows):>8}{sum(r['samples'] for r in rows):>12,}"
                 f"{sum(r['tokens'] for r in rows):>15,}{'':>10}{100.0:>11.1f}")
    lines.append("tokens %: share of the trained tokens (non-padding positions); rows are drawn so tokens follow it")
    return "\n".join(lines)


def build_datasets(plan: BlendPlan, config_kwargs: dict, sizes: Sequence[Optional[int]],
                   dataset_cls: type = UALMDataset) -> list:
    """Builds the train / valid / test ``BlendedDataset``s of a plan (rules: module docstring).

    Megatron's ``BlendedMegatronDatasetBuilder`` gives every split the same weights and builds
    a dataset for every shard and split, so it can neither leave a shard out of a split it
    has no records in nor weigh rows by their tokens; this function builds the same
    datasets through its ``build_generic_dataset`` (rank 0 first, then the other ranks from
    its cache) with per-split weights. Each split's rows per shard are Megatron's
    (``ceil(size * weight)`` plus its ``mid_level_dataset_surplus``).

    Args:
        plan: the blend.
        config_kwargs: ``UALMDatasetConfig`` fields (``random_seed``, ``sequence_length``,
            ``split``, ``vocab``, ``audio_in``, ``path_to_cache``, ...).
        sizes: rows wanted per split (train, valid, test); None or 0: the split is not built.
        dataset_cls: ``UALMDataset`` (packed rows) or a subclass with its own items (the DPO
            pairs of ``data.preference.PreferenceDataset``); it gives ``tokens_per_row``.

    Returns:
        ``[train, valid, test]``, None for a split not built. Items carry ``dataset_id``, the
        index of their shard in ``plan``.

    Raises:
        ShardError: a damaged shard, named with the file at fault.
        ValueError: rows are asked of the train split but no shard has a record in it.
    """
    config = UALMDatasetConfig(blend=plan.megatron_blend(), **config_kwargs)
    build = BlendedMegatronDatasetBuilder.build_generic_dataset
    readers: dict[int, ShardReader] = {}
    out = []
    for split in Split:
        size, bounds = int(sizes[split.value] or 0), config.split_matrix[split.value]
        if size == 0 or bounds is None:
            out.append(None)
            continue
        members = []  # (shard index, its records in this split)
        for i, path in enumerate(plan.shards):
            if i not in readers:
                readers[i] = dataset_cls.build_low_level_dataset(path, config)
            n = len(readers[i])
            begin, end = int(round(bounds[0] * n)), int(round(bounds[1] * n))  # Megatron's split rule
            if end > begin:
                members.append((i, np.arange(begin, end, dtype=np.int32)))
        if not members:
            if split == Split.train:
                raise ValueError(f"no shard has a record in the train split of split={config.split!r} "
                                 f"({len(plan.shards)} shards, {sum(plan.samples)} records); give the train split "
                                 "a larger part")
            log_single_rank(logger, logging.WARNING,
                            f"no shard has a record in the {split.name} split of split={config.split!r}: the "
                            f"{split.name} split is left out (its {size} rows are not drawn)")
            out.append(None)
            continue
        if len(members) < len(plan.shards):
            log_single_rank(logger, logging.WARNING,
                            f"{len(members)} of {len(plan.shards)} shards have records in the {split.name} split "
                            f"of split={config.split!r}; its blend is renormalised over them")
        # One epoch of each shard's packed rows gives its tokens per row.
        epochs = [build(dataset_cls, lambda: True, True, readers[i], plan.shards[i], ids, None, split, config)
                  for i, ids in members]
        rates = np.array([plan.weights[i] / ds.tokens_per_row for (i, _), ds in zip(members, epochs)])
        weights = (rates / rates.sum()).tolist()
        targets = [math.ceil(size * w) for w in weights]
        datasets = []
        for (i, ids), ds, target in zip(members, epochs, targets):
            rows = math.ceil(target * (1 + config.mid_level_dataset_surplus))
            if len(ds) < rows:
                ds = build(dataset_cls, lambda: True, True, readers[i], plan.shards[i], ids, rows, split, config)
            ds.shard_index = i
            datasets.append(ds)
        out.append(build(BlendedDataset, lambda: True, True, datasets, weights, sum(targets), config))
    return out


def load_plan(path: str) -> BlendPlan:
    """Reads a blend file written by ``tools/build_blend.py``.

    A blend file written before blend files stored the token-id layout gets it from its
    shards' sidecars.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not a blend file, or a field missing or malformed (named).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"blend file {path} does not exist; write it with "
                                f"tools/build_blend.py SHARD_DIRS --output {path}")
    try:
        with open(path) as f:
            blob = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a blend file: invalid JSON ({err})") from None
    try:
        plan = BlendPlan.from_json(blob)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if plan.vocab_layout is None:
        plan.vocab_layout = shared_layout([(p, shard_layout(read_sidecar(p))) for p in plan.shards])
    return plan


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

    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    from megatron_ualm.data.batch import collate_packed

    if consumed_samples >= len(dataset):
        # A finished run started again (a recipe rerun after a later step was killed) draws no
        # batch, but Megatron's sampler refuses to start at the end of an exactly-sized dataset.
        consumed_samples = 0
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size)
    collate_fn = collate_fn or partial(collate_packed, seq_length=seq_length, vocab=vocab, attention_mask=attention_mask)
    return _WorkerLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
        collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_termination if num_workers else None)


class _WorkerLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose worker iterators are stopped at exit (``_shut_down``).

    The iterators are what must be tracked, not the loaders: a caller that keeps only
    ``iter(loader)`` (Megatron keeps the iterators) lets the loader be collected while its
    workers run on. ``_get_iterator`` is torch's hook that creates an iterator.
    """

    def _get_iterator(self):
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _WORKER_ITERATORS.add(iterator)
            if not _SHUT_DOWN_REGISTERED:
                _register_shut_down()
        return iterator


_WORKER_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()
_SHUT_DOWN_REGISTERED = False


def ignore_termination(worker_id: int) -> None:
    """Data-loader workers leave SIGTERM to the training process.

    Slurm (a requeue, a time limit) sends SIGTERM to every process of the job step. With
    Megatron's ``--exit-signal-handler`` the training rank saves a checkpoint at the end of its
    iteration and exits; a worker that died of the same signal would instead make the rank's
    next batch raise before that save. Workers end when the loader shuts down (``_shut_down``,
    also at exit) or when their parent dies (torch's worker watchdog).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _shut_down() -> None:
    """Stops the workers of every worker iterator still alive at exit, through its own shutdown.

    Workers that ignore SIGTERM would otherwise hang the exit of every process whose iterators
    outlive ``main`` (a run that failed keeps them in its traceback): Python's multiprocessing
    ends daemon children with SIGTERM and then joins them, forever. This handler must run
    before that one and before torch's, which turns ``_shutdown_workers`` into a no-op; atexit
    runs last-in, first-out, so it is registered once workers exist (``_register_shut_down``),
    after both. ``_shutdown_workers`` is torch's private name for the graceful shutdown.
    """
    for iterator in list(_WORKER_ITERATORS):
        if hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


def _register_shut_down() -> None:
    global _SHUT_DOWN_REGISTERED
    _SHUT_DOWN_REGISTERED = True
    atexit.register(_shut_down)
