"""Shard-task caching (tasks/caching.py) under a real Prefect server, on the local store and on
SeaweedFS: a rerun of done shards is a cache hit (task state "Cached"); a deleted manifest, a
deleted output, a changed input or --force is a miss and the shard is really redone; the cache
records live in the store, and the block naming them holds no credential."""
from __future__ import annotations

import collections
import json
import os

import anyio
import pytest

from flows.extract_features import extract_features
from flows.generate_codes import encode, train_coders
from flows.ingest import ingest
from infra import layout
from infra.shards import read_table, write_table
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn


def task_states(state, task_name: str) -> collections.Counter:
    """State names of the runs of task `task_name` (its function's name: run names are templates)
    in the flow run that ended in `state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as c:
            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return collections.Counter(r.state.name for r in runs if r.task_key.rsplit("-", 1)[0] == task_name)

    return anyio.run(read)


def test_rerun_hits_the_cache_and_any_change_misses(prefect_server, any_settings):
    cfg = settings_dict(any_settings)
    store = open_store(any_settings)
    ingest("digits", shard_rows=600, settings=cfg)  # parts 0..2
    register_untrained_cnn(store)

    def extract(**kw):
        st = extract_features("digits", "test-cnn", settings=cfg, return_state=True, **kw)
        return st.result(), task_states(st, "extract_shard")

    first, states = extract()
    assert (first["done"], states) == (3, {"Completed": 3})
    records = store.list("_prefect_results/")
    assert len(records) == 3  # one per committed shard, in the store itself

    again, states = extract()
    assert (again["skipped"], again["rows"], states) == (3, 1797, {"Cached": 3})

    # a deleted manifest: that shard misses and is redone (the others still hit)
    store.delete(layout.manifest_key("extract", "digits", "test-cnn", 1))
    s, states = extract()
    assert (s["done"], s["skipped"], states) == (1, 2, {"Completed": 1, "Cached": 2})
    assert store.exists(layout.manifest_key("extract", "digits", "test-cnn", 1))

    # a deleted output (manifest kept): a miss, and the manifest check redoes it
    store.delete(layout.features_key("digits", "test-cnn", 0))
    s, states = extract()
    assert (s["done"], states) == (1, {"Completed": 1, "Cached": 2})

    # a changed input shard (one row fewer): a miss, redone from the new input
    raw2 = read_table(store, layout.raw_key("digits", 2))
    write_table(store, layout.raw_key("digits", 2), raw2.slice(0, raw2.num_rows - 1))
    s, states = extract()
    assert (s["done"], s["rows"], states) == (1, 1796, {"Completed": 1, "Cached": 2})

    # --force bypasses the cache: every shard runs and is redone
    s, states = extract(force=True)
    assert (s["done"], states) == (3, {"Completed": 3})
    s, states = extract()
    assert (s["skipped"], states) == (3, {"Cached": 3})

    # encode_shard caches the same way
    [card] = train_coders("digits", "test-cnn", {"itq": 16}, settings=cfg)
    encode_state = lambda: encode("digits", "test-cnn", [card["coder_id"]], settings=cfg,  # noqa: E731
                                  return_state=True)
    st = encode_state()
    assert st.result()[0]["done"] == 3 and task_states(st, "encode_shard") == {"Completed": 3}
    st = encode_state()
    assert st.result()[0]["skipped"] == 3 and task_states(st, "encode_shard") == {"Cached": 3}


@pytest.mark.s3
def test_result_storage_block_holds_no_credential(prefect_server, s3_settings):
    """The saved block names the store, endpoint and region only; records are JSON, not pickles."""
    from prefect.client.orchestration import get_client

    from tasks.caching import result_storage

    block = result_storage(s3_settings)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    async def read():
        async with get_client() as c:
            return await c.read_block_document(block._block_document_id, include_secrets=True)

    doc = anyio.run(read)
    assert doc.data == {"store": s3_settings.store, "s3_endpoint": s3_settings.s3_endpoint,
                        "s3_region": s3_settings.s3_region}
    assert secret not in json.dumps(doc.data)

    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    ingest("digits", shard_rows=900, settings=cfg)
    register_untrained_cnn(store)
    extract_features("digits", "test-cnn", settings=cfg)
    [info, _] = store.list("_prefect_results/")
    record = json.loads(store.read_bytes(info.key))
    assert record["metadata"]["serializer"]["type"] == "json"
    assert json.loads(record["result"])["status"] == "skipped"
    assert secret.encode() not in store.read_bytes(info.key)
