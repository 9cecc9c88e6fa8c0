"""infra/manifests.py on a local store: a manifest proves a shard done only for the same input,
code version and output; quarantine records are found again for the same input and code only."""
from __future__ import annotations

import json

import pytest

from infra import layout
from infra import manifests as M
from infra.store import LocalStore


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path)


def _done(store, part: int = 0) -> tuple[str, M.Manifest]:
    out = layout.features_key("d", "m", part)
    etag = store.write_bytes(out, b"features")
    m = M.Manifest("extract", "d", part, layout.raw_key("d", part), "in-etag", 10, out, etag, "code-1")
    key = layout.manifest_key("extract", "d", "m", part)
    M.write_manifest(store, key, m)
    return key, m


def test_manifest_round_trip_names_its_writer():
    m = M.Manifest("extract", "d", 3, "raw/d/x", "a", 5, "features/d/m/x", "b", "v1", stats={"dim": 4})
    assert M.Manifest.from_json(m.to_json()) == m
    host, pid = m.writer.rsplit(":", 1)
    assert host and pid.isdigit()


def test_a_manifest_from_before_writers_were_recorded_reads_with_an_empty_writer():
    fields = json.loads(M.Manifest("extract", "d", 0, "i", "a", 1, "o", "b", "v").to_json())
    del fields["writer"]
    assert M.Manifest.from_json(json.dumps(fields).encode()).writer == ""


def test_done_only_for_the_same_input_code_version_and_output(store):
    key, m = _done(store)
    assert M.done_manifest(store, key, "in-etag", "code-1") == m
    assert M.done_manifest(store, key, "other-input", "code-1") is None
    assert M.done_manifest(store, key, "in-etag", "code-2") is None
    store.write_bytes(m.output_key, b"rewritten by someone else")
    assert M.done_manifest(store, key, "in-etag", "code-1") is None


def test_a_missing_or_unreadable_manifest_means_not_done(store):
    key = layout.manifest_key("extract", "d", "m", 9)
    assert M.read_manifest(store, key) is None
    store.write_bytes(key, b"{not json")
    assert M.read_manifest(store, key) is None


def test_a_quarantine_reason_holds_for_the_same_input_and_code_only(store):
    bad = layout.raw_key("d", 4)
    store.write_bytes(bad, b"broken parquet")
    qkey = M.quarantine_shard(store, "extract", bad, "truncated", "etag-4", code_version="code-1")
    assert store.read_bytes(qkey) == b"broken parquet"  # the bad bytes are kept, not dropped
    assert M.quarantine_reason(store, "extract", bad, "etag-4", "code-1") == "truncated"
    assert M.quarantine_reason(store, "extract", bad, "etag-4") == "truncated"
    assert M.quarantine_reason(store, "extract", bad, "new-etag", "code-1") is None
    assert M.quarantine_reason(store, "extract", bad, "etag-4", "code-2") is None
    [record] = M.list_quarantine(store, "extract")
    assert (record["key"], record["reason"], record["input"]) == (bad, "truncated", store.uri_of(bad))
