from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from infra.planner import batch_shards, parse_shard_range, row_slices, select_shards
from infra.store import ObjectInfo


def test_parse_shard_range():
    assert parse_shard_range("120:180") == (120, 180)
    assert parse_shard_range("7") == (7, 8)
    assert parse_shard_range(":50") == (0, 50)
    assert parse_shard_range(None) is None
    with pytest.raises(ValueError):
        parse_shard_range("9:3")


def test_select_shards_filters_and_sorts():
    infos = [ObjectInfo(f"raw/d/part-{p:05d}.parquet", 1, f"e{p}") for p in (5, 1, 3, 200)]
    infos.append(ObjectInfo("raw/d/_staging.json", 1, "x"))
    assert [r.part for r in select_shards(infos)] == [1, 3, 5, 200]
    assert [r.part for r in select_shards(infos, (2, 6))] == [3, 5]


@given(st.integers(0, 5000), st.integers(1, 300))
def test_batch_shards_covers_in_order(n, max_tasks):
    items = list(range(n))
    batches = batch_shards(items, max_tasks=max_tasks)
    assert [x for b in batches for x in b] == items
    assert len(batches) <= max_tasks


@given(st.integers(0, 100_000), st.integers(1, 20_000))
def test_row_slices_partition(n, size):
    sl = row_slices(n, size)
    assert sum(b - a for a, b in sl) == n
    assert all(b - a <= size for a, b in sl)
    assert all(sl[i][1] == sl[i + 1][0] for i in range(len(sl) - 1))
