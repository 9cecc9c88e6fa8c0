"""Fan-out of per-shard work: one (cached) task per shard, or batches of shards when there are many."""
from __future__ import annotations

from typing import Any

from prefect import Task

from flows.limits import server_tagged
from infra.planner import ShardRef, batch_shards
from infra.settings import Settings
from tasks.caching import result_storage


def submit_shard_tasks(cfg: Settings, one: Task, many: Task, refs: list[ShardRef], *args: Any,
                       force: bool = False) -> tuple[list[Any], list[list[int]]]:
    """(futures, the parts each covers) of `one(cfg, *args, ref, force)` per shard (cached in the store: tasks/caching.py) when
    there are at most `cfg.max_shard_tasks` shards; beyond that, of `many(cfg, *args, batch, force)`
    over at most that many contiguous batches, so thousands of shards cost a bounded number of
    task runs (~0.1 s of Prefect per run here, more on Dask: BENCHMARKS.md section 8)."""
    one, many = server_tagged(one, many)  # no slot request for a tag without a server limit
    if len(refs) <= cfg.max_shard_tasks:
        shard_task = one.with_options(result_storage=result_storage(cfg))
        return [shard_task.submit(cfg, *args, ref, force) for ref in refs], [[ref.part] for ref in refs]
    batches = batch_shards(refs, cfg.max_shard_tasks)
    return ([many.submit(cfg, *args, batch, force) for batch in batches],
            [[ref.part for ref in batch] for batch in batches])
