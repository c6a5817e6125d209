"""Which input records go into which output shard, and which task owns each shard.

A corpus is a sequence of *units*, each with a record count known up front (counted from
tar headers, Parquet metadata or manifest lines, never by decoding audio):

- a *whole* unit (a WebDataset tar, a Lhotse Shar shard, a Parquet row group) is read by one
  task from start to end;
- a *divisible* unit (a JSONL manifest, a Lhotse cut manifest, a WavCaps JSON file) is a plain
  record stream whose records may go to any shard.

Shards are cut from the units in order. Records of divisible units fill shards of exactly
``records_per_shard`` across unit boundaries, as manifests always did. Whole units are packed:
consecutive whole units share a shard while their records fit in ``records_per_shard``; a
whole unit larger than that is cut into several shards. Every shard is a *group* of its own,
except the shards of one large whole unit, which form one group. Group ``g`` belongs to task
``g mod N`` (``tasks.owned_shards``), so N tasks read disjoint units, and the layout depends on
neither N nor the number of workers: the union of N tasks' shards is byte-identical to a
one-task run. Without whole units the layout is exactly the manifests' (shard ``k`` =
records ``[k R, (k + 1) R)``, task ``k mod N``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_ualm.data.tasks import Task, owned_shards


@dataclass(frozen=True)
class Unit:
    """A piece of input with a known record count.

    Attributes:
        records: how many records it holds (kept and rejected alike).
        whole: True when one task reads it whole (a tar, a Shar shard, a row group).
    """

    records: int
    whole: bool


class Layout:
    """Shards cut from units (see the module docstring).

    Args:
        units: the corpus's units, in input order.
        per_shard: ``--records-per-shard``.
    """

    def __init__(self, units: Sequence[Unit], per_shard: int):
        if per_shard < 1:
            raise ValueError(f"records per shard must be >= 1, got {per_shard}")
        self.per_shard = per_shard
        starts: list[int] = []  # first record of each shard
        group_starts: list[int] = []  # first shard of each group
        filled = 0  # records in the open (last) shard
        total = 0

        def open_shard(new_group: bool = True) -> None:
            nonlocal filled
            starts.append(total)
            if new_group:
                group_starts.append(len(starts) - 1)
            filled = 0

        for unit in units:
            n = unit.records
            if n == 0:
                continue
            if not unit.whole:
                while n:
                    if not starts or filled == per_shard:
                        open_shard()
                    take = min(n, per_shard - filled)
                    filled, total, n = filled + take, total + take, n - take
                continue
            if not starts or filled + n > per_shard:
                open_shard()
            if n <= per_shard - filled:
                filled, total = filled + n, total + n
                continue
            # A unit larger than a shard (it starts an empty one): its shards are one group.
            for i in range(0, n, per_shard):
                if i:
                    open_shard(new_group=False)
                take = min(per_shard, n - i)
                filled, total = take, total + take
            filled = per_shard  # the next unit starts a new shard and group
        self.records = total
        self._starts = starts
        self._group_starts = group_starts

    @property
    def num_shards(self) -> int:
        return len(self._starts)

    @property
    def group_starts(self) -> Optional[list[int]]:
        """First shard of each group, or None when every shard is its own group (plain manifests)."""
        return None if len(self._group_starts) == len(self._starts) else list(self._group_starts)

    def first(self, k: int) -> int:
        """Global index of shard ``k``'s first record."""
        return self._starts[k]

    def size(self, k: int) -> int:
        """Records of shard ``k``."""
        end = self._starts[k + 1] if k + 1 < len(self._starts) else self.records
        return end - self._starts[k]

    def shard_of(self, record: int) -> int:
        """The shard holding global record ``record``."""
        return bisect.bisect_right(self._starts, record) - 1

    def task_shards(self, task: Task) -> list[int]:
        """The shards ``task`` writes."""
        return owned_shards(task.index, task.count, self.num_shards, self.group_starts)
