from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
from hypothesis import given, strategies as st

from infra.planner import (batch_shards, parse_date_range, parse_shard_range, parse_shard_ranges, partition_date,
                           parts_spec, row_slices, select_by_date, select_shards)
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


def test_shard_lists_and_parts_spec():
    assert parse_shard_ranges("0:3,7,9:12") == [(0, 3), (7, 8), (9, 12)]
    assert parse_shard_ranges("") is None and parse_shard_ranges(None) is None
    assert parts_spec([12, 6, 7, 8, 8]) == "6:9,12" and parts_spec([]) == ""
    infos = [ObjectInfo(f"raw/d/part-{p:05d}.parquet", 1, f"e{p}") for p in range(15)]
    assert [r.part for r in select_shards(infos, [(0, 3), (7, 8)])] == [0, 1, 2, 7]
    assert [r.part for r in select_shards(infos, (13, 20))] == [13, 14]


@given(st.sets(st.integers(0, 300)))
def test_parts_spec_selects_exactly_those_parts(parts):
    infos = [ObjectInfo(f"raw/d/part-{p:05d}.parquet", 1, "e") for p in range(301)]
    spec = parts_spec(parts)
    selected = [r.part for r in select_shards(infos, parse_shard_ranges(spec))] if parts else []
    assert selected == sorted(parts)


def test_dates():
    assert parse_date_range("2026-11-01:2026-11-30") == (date(2026, 11, 1), date(2026, 11, 30))
    assert parse_date_range("2026-11-05") == (date(2026, 11, 5), date(2026, 11, 5))
    with pytest.raises(ValueError, match="LAST >= FIRST"):
        parse_date_range("2026-11-30:2026-11-01")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_date_range("2026-13-01")
    assert partition_date("2026-11-02") == "2026-11-02"
    assert partition_date(None) == datetime.now(timezone.utc).date().isoformat()
    dates = {0: "2026-10-31", 1: "2026-11-01", 2: "2026-11-30", 3: "2026-12-01", 4: None}
    assert select_by_date(dates, parse_date_range("2026-11-01:2026-11-30")) == [1, 2]  # inclusive ends
    assert select_by_date(dates, parse_date_range("2026-11-01")) == [1]
    assert select_by_date({}, parse_date_range("2026-11-01")) == []
