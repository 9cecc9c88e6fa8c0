"""flows/fanout.py: past `max_shard_tasks` shards, extract and encode run batches of shards per task
run (bounded task count), with the same outputs, skipping and quarantine as one task per shard."""
from __future__ import annotations

import collections

import anyio

from flows.extract_features import extract_features
from flows.generate_codes import encode, train_coders
from flows.ingest import ingest
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn


def task_names(state) -> collections.Counter:
    """Task-run counts by task (its key 'extract_shards-7f3…' -> 'extract_shards') of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as c:
            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return collections.Counter(r.task_key.rsplit("-", 1)[0] for r in runs)

    return anyio.run(read)


def test_many_shards_run_in_batches_and_a_rerun_skips_them(prefect_server, local_settings):
    cfg = {**settings_dict(local_settings), "max_shard_tasks": 4}
    store = open_store(local_settings)
    ingest("digits", shard_rows=100, settings=cfg)  # 18 shards
    register_untrained_cnn(store)

    st = extract_features("digits", "test-cnn", settings=cfg, return_state=True)
    s, names = st.result(), task_names(st)
    assert s["done"] == 18 and s["rows_written"] == 1797 and not s["failed"]
    assert names["extract_shards"] == 4 and names["extract_shard"] == 0  # 18 shards in 4 task runs
    assert len(store.list("features/digits/test-cnn/")) == 18

    train_coders("digits", "test-cnn", {"itq": 16}, settings=cfg)
    st = encode("digits", "test-cnn", ["itq-16-test-cnn"], settings=cfg, return_state=True)
    (e,), names = st.result(), task_names(st)
    assert e["done"] == 18 and names["encode_shards"] == 4 and names["encode_shard"] == 0

    # a rerun skips every shard inside the batches; a deleted output is redone, nothing else
    store.delete("features/digits/test-cnn/part-00005.parquet")
    store.delete("_manifests/extract/digits/test-cnn/part-00005.json")
    s = extract_features("digits", "test-cnn", settings=cfg)
    assert (s["done"], s["skipped"]) == (1, 17)
