"""Shards cut from units: manifests keep their layout, whole units go to one task, tasks partition."""

from __future__ import annotations

import pytest

from megatron_ualm.data.sources.layout import Layout, Unit
from megatron_ualm.data.tasks import Task, owned_shards


def shards(layout: Layout) -> list[tuple[int, int]]:
    return [(layout.first(k), layout.size(k)) for k in range(layout.num_shards)]


def test_record_streams_keep_the_manifest_layout():
    # Two manifests of 45 and 40 records, 20 per shard: shard k = records [20k, 20k + 20), task k mod N.
    layout = Layout([Unit(45, False), Unit(0, False), Unit(40, False)], 20)
    assert shards(layout) == [(0, 20), (20, 20), (40, 20), (60, 20), (80, 5)]
    assert layout.group_starts is None
    assert layout.task_shards(Task(1, 2)) == Task(1, 2).shards(5) == [1, 3]
    assert [layout.shard_of(r) for r in (0, 19, 20, 84)] == [0, 0, 1, 4]


def test_whole_units_are_packed_and_large_ones_cut_into_one_group():
    # Tars of 4, 4, 3, 11 (cut into 5 + 5 + 1), 2 samples; 10 per shard.
    layout = Layout([Unit(4, True), Unit(4, True), Unit(3, True), Unit(11, True), Unit(2, True)], 10)
    assert shards(layout) == [(0, 8), (8, 3), (11, 10), (21, 1), (22, 2)]
    assert layout.group_starts == [0, 1, 2, 4]
    assert layout.records == 24
    # Task 0 of 2 owns groups 0 and 2 (the large tar's two shards), task 1 groups 1 and 3.
    assert layout.task_shards(Task(0, 2)) == [0, 2, 3]
    assert layout.task_shards(Task(1, 2)) == [1, 4]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_tasks_partition_the_shards(count):
    units = [Unit(n, True) for n in (7, 1, 30, 2, 2, 9, 0, 15, 3)]
    layout = Layout(units, 8)
    owned = [layout.task_shards(Task(i, count)) for i in range(count)]
    assert sorted(k for ks in owned for k in ks) == list(range(layout.num_shards))
    # Every unit's records lie in shards of one task only.
    first = 0
    for unit in units:
        if unit.records:
            ks = {layout.shard_of(r) for r in range(first, first + unit.records)}
            assert sum(bool(ks & set(o)) for o in owned) == 1
        first += unit.records


def test_owned_shards_matches_the_plain_split_without_groups():
    assert owned_shards(2, 3, 10) == [2, 5, 8]
    assert owned_shards(1, 2, 6, [0, 1, 4]) == [1, 2, 3]
    with pytest.raises(ValueError, match=">= 1"):
        Layout([Unit(3, True)], 0)
