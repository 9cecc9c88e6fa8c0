"""Shard planning: which shards a run covers and how they are grouped into tasks. Pure functions.

Skip-if-done is decided per shard by its task (one manifest read, in parallel), so planning
costs one listing of the input prefix and nothing per shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

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


def select_shards(infos: Sequence[ObjectInfo], shard_range: tuple[int, int] | None = None) -> list[ShardRef]:
    """Shard objects (part-NNNNN.parquet) in `shard_range`, sorted by part. Other keys are ignored."""
    out = []
    for info in infos:
        try:
            part = layout.part_of(info.key)
        except ValueError:
            continue
        if shard_range is None or shard_range[0] <= part < shard_range[1]:
            out.append(ShardRef(info.key, part, info.etag, info.size))
    return sorted(out, key=lambda r: r.part)


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
