"""tasks/stage.py run_shard_stage outside Prefect, on a local store: a shard is done once, redone
when its input changes or when forced, and bad input is quarantined with its reason (its bytes
kept) while a rerun skips it until the input changes."""
from __future__ import annotations

import numpy as np
import pytest

from infra import layout
from infra.manifests import list_quarantine
from infra.planner import ShardRef
from infra.shards import ShardInvalid, features_table, read_table
from infra.store import LocalStore
from tasks.stage import run_shard_stage


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path)


def _ref(store, part: int, data: bytes) -> ShardRef:
    key = layout.raw_key("d", part)
    etag = store.write_bytes(key, data)
    return ShardRef(key, part, etag, len(data))


def _run(store, ref, work, force=False):
    return run_shard_stage(store, stage="extract", dataset="d", output_id="m", ref=ref,
                           output_key=layout.features_key("d", "m", ref.part), code_version="v1",
                           force=force, work=work)


def test_a_done_shard_is_skipped_until_its_input_changes_or_it_is_forced(store):
    calls = []

    def work():
        calls.append(1)
        return features_table(np.arange(3), np.ones((3, 4), np.float32)), {"dim": 4}

    ref = _ref(store, 0, b"raw bytes")
    first = _run(store, ref, work)
    assert (first.status, first.rows, len(calls)) == ("done", 3, 1)
    assert read_table(store, layout.features_key("d", "m", 0)).num_rows == 3
    assert _run(store, ref, work).status == "skipped" and len(calls) == 1
    assert _run(store, ref, work, force=True).status == "done" and len(calls) == 2
    changed = _ref(store, 0, b"new raw bytes")
    assert _run(store, changed, work).status == "done" and len(calls) == 3


def test_bad_input_is_quarantined_with_its_reason_and_skipped_until_it_changes(store):
    def bad():
        raise ShardInvalid(layout.raw_key("d", 1), "truncated Parquet")

    ref = _ref(store, 1, b"broken")
    out = _run(store, ref, bad)
    assert (out.status, out.reason) == ("quarantined", "truncated Parquet")
    [record] = list_quarantine(store, "extract")
    assert record["key"] == ref.key and store.read_bytes(layout.quarantine_key("extract", ref.key)) == b"broken"
    assert not store.exists(layout.features_key("d", "m", 1))  # nothing partial written
    again = _run(store, ref, lambda: pytest.fail("a quarantined input is not read again"))
    assert (again.status, again.reason) == ("quarantined", "truncated Parquet")
    fixed = _ref(store, 1, b"fixed")
    good = _run(store, fixed, lambda: (features_table(np.arange(2), np.ones((2, 4), np.float32)), {}))
    assert good.status == "done"
