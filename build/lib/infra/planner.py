"""Shard planning: which shards a run covers and how they are grouped into tasks. Pure functions.

Skip-if-done is decided per shard by its task (one manifest read, in parallel), so planning
costs one listing of the input prefix and nothing per shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Iterable, Mapping, Sequence, TypeVar

from infra import layout
from infra.store import ObjectInfo

T = TypeVar("T")


@dataclass(frozen=True)
class ShardRef:
    """One input shard: its key, part number and checksum (ETag) at planning time."""

    key: str
    part: int
    checksum: str
    size: int


def parse_shard_range(spec: str | None) -> tuple[int, int] | None:
    """'120:180' -> (120, 180), half-open; '7' -> (7, 8); ':50' -> (0, 50); None/'' -> None."""
    if spec is None or str(spec).strip() in ("", ":"):
        return None
    spec = str(spec).strip()
    if ":" not in spec:
        p = int(spec)
        return (p, p + 1)
    lo, hi = spec.split(":", 1)
    start = int(lo) if lo else 0
    stop = int(hi) if hi else 2**62
    if start < 0 or stop <= start:
        raise ValueError(f"empty or negative shard range {spec!r}: use START:STOP with STOP > START >= 0")
    return (start, stop)


def parse_shard_ranges(spec: str | None) -> list[tuple[int, int]] | None:
    """'0:3,7,9:12' -> [(0, 3), (7, 8), (9, 12)]: comma-separated ranges, each as parse_shard_range;
    None/'' -> None (every shard)."""
    if spec is None or not str(spec).strip():
        return None
    ranges = [r for r in (parse_shard_range(item) for item in str(spec).split(",")) if r is not None]
    return ranges or None


def parts_spec(parts: Iterable[int]) -> str:
    """The shard spec of exactly `parts`: [6, 7, 8, 12] -> '6:9,12' (runs of parts become ranges)."""
    runs: list[list[int]] = []  # [start, stop)
    for part in sorted(set(parts)):
        if runs and runs[-1][1] == part:
            runs[-1][1] = part + 1
        else:
            runs.append([part, part + 1])
    return ",".join(str(a) if b == a + 1 else f"{a}:{b}" for a, b in runs)


def select_shards(infos: Sequence[ObjectInfo],
                  shard_range: tuple[int, int] | Sequence[tuple[int, int]] | None = None) -> list[ShardRef]:
    """Shard objects (part-NNNNN.parquet) in `shard_range` (one half-open range or a list of them),
    sorted by part. Other keys are ignored."""
    ranges = [shard_range] if isinstance(shard_range, tuple) and isinstance(shard_range[0], int) \
        else list(shard_range or [])
    out = []
    for info in infos:
        try:
            part = layout.part_of(info.key)
        except ValueError:
            continue
        if not ranges or any(lo <= part < hi for lo, hi in ranges):
            out.append(ShardRef(info.key, part, info.etag, info.size))
    return sorted(out, key=lambda r: r.part)


def partition_date(spec: str | None = None) -> str:
    """The partition date ingest records for the shards it writes: `spec` ('YYYY-MM-DD', checked)
    or, by default, today's UTC date."""
    if spec is None or not str(spec).strip():
        return datetime.now(timezone.utc).date().isoformat()
    return _date(str(spec).strip()).isoformat()


def parse_date_range(spec: str) -> tuple[date, date]:
    """'2026-11-01:2026-11-30' -> both days, inclusive; '2026-11-01' -> that day alone."""
    lo, _, hi = str(spec).strip().partition(":")
    first, last = _date(lo), _date(hi) if hi else _date(lo)
    if last < first:
        raise ValueError(f"empty date range {spec!r}: use FIRST:LAST (inclusive) with LAST >= FIRST")
    return first, last


def select_by_date(dates: Mapping[int, str | None], date_range: tuple[date, date]) -> list[int]:
    """Parts whose partition date (`dates`: part -> 'YYYY-MM-DD', or None when unknown) falls in
    `date_range` (inclusive), sorted. Parts without a known date never match."""
    first, last = date_range
    return sorted(p for p, d in dates.items() if d is not None and first <= _date(d) <= last)


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date: {text!r} (use YYYY-MM-DD)") from None


def batch_shards(items: Sequence[T], max_tasks: int = 256, min_per_task: int = 1) -> list[list[T]]:
    """Group items into at most `max_tasks` contiguous batches of near-equal size, so thousands of
    shards become a bounded number of tasks (task overhead ~0.1-1 s each)."""
    if not items:
        return []
    per = max(min_per_task, -(-len(items) // max_tasks))
    return [list(items[i:i + per]) for i in range(0, len(items), per)]


def row_slices(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges that cut `n_rows` into shards of `shard_rows` (last one shorter)."""
    if shard_rows <= 0:
        raise ValueError("shard_rows must be positive")
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]
