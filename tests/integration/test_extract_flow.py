"""Ingest + extract on real data (sklearn digits) against SeaweedFS S3 under a real Prefect server."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flows.extract_features import extract_features
from flows.ingest import ingest
from infra import layout
from infra.manifests import list_quarantine
from infra.planner import select_shards
from infra.shards import features_matrix, read_table, table_bytes
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn

pytestmark = pytest.mark.s3


def features_by_id(store, dataset, model_id):
    ids, feats = [], []
    for ref in select_shards(store.list(layout.features_prefix(dataset, model_id))):
        t = read_table(store, ref.key)
        ids.append(t.column("id").to_numpy())
        feats.append(features_matrix(t))
    ids = np.concatenate(ids)
    order = np.argsort(ids)
    return ids[order], np.concatenate(feats)[order]


def test_ingest_extract_resume_on_s3(prefect_server, s3_settings):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    s = ingest("digits", shard_rows=400, settings=cfg)
    assert (s["shards"], s["done"], s["rows"]) == (5, 5, 1797)
    assert ingest("digits", shard_rows=400, settings=cfg)["skipped"] == 5

    raw = read_table(store, layout.raw_key("digits", 0))
    assert raw.column_names == ["id", "image", "label", "split"]
    assert set(raw.column("split").to_pylist()) <= {"query", "train", "val", "database"}

    register_untrained_cnn(store)
    first = extract_features("digits", "test-cnn", settings=cfg)
    assert (first["done"], first["skipped"], first["rows"]) == (5, 0, 1797)
    ids, feats = features_by_id(store, "digits", "test-cnn")
    assert len(np.unique(ids)) == 1797 and feats.shape == (1797, 32) and np.isfinite(feats).all()

    again = extract_features("digits", "test-cnn", settings=cfg)
    assert (again["done"], again["skipped"]) == (0, 5)
    # skipping reads manifests only, never a raw shard, and writes nothing
    raw_reads, writes = store.read_count("raw/"), store.write_count()
    extract_features("digits", "test-cnn", settings=cfg)
    assert store.read_count("raw/") == raw_reads and store.write_count() == writes

    # --force redoes, bit-identical
    forced = extract_features("digits", "test-cnn", shards="1:3", force=True, settings=cfg)
    assert (forced["done"], forced["shards"]) == (2, 2)
    ids2, feats2 = features_by_id(store, "digits", "test-cnn")
    np.testing.assert_array_equal(feats2, feats)


def test_bad_shards_are_quarantined_and_the_rest_finish(prefect_server, any_settings):
    cfg = settings_dict(any_settings)
    store = open_store(any_settings)
    ingest("digits", shard_rows=600, settings=cfg)  # parts 0..2
    good = store.read_bytes(layout.raw_key("digits", 0))
    store.write_bytes(layout.raw_key("digits", 3), good[: len(good) // 2])  # truncated Parquet
    store.write_bytes(layout.raw_key("digits", 4), table_bytes(pa.table({"id": [1, 2], "pixels": [b"x", b"y"]})))
    bad_img = pa.table({"id": pa.array([900001, 900002], pa.int64()), "image": [b"\x89PNG garbage", b"nope"]})
    store.write_bytes(layout.raw_key("digits", 5), table_bytes(bad_img))
    register_untrained_cnn(store)

    s = extract_features("digits", "test-cnn", settings=cfg)
    assert (s["done"], len(s["quarantined"]), s["failed"]) == (3, 3, [])
    reasons = {q["part"]: q["reason"] for q in s["quarantined"]}
    assert "not a readable Parquet" in reasons[3]
    assert "needs a 'image' column" in reasons[4]
    assert "id 900001: not a decodable image" in reasons[5]
    records = list_quarantine(store, "extract")
    assert sorted(r["key"] for r in records) == [layout.raw_key("digits", p) for p in (3, 4, 5)]
    for r in records:  # the bad bytes are kept, nothing disappears
        assert store.read_bytes(layout.quarantine_key("extract", r["key"])) == store.read_bytes(r["key"])

    # a rerun skips the good shards and reports the quarantined ones again without reprocessing
    s2 = extract_features("digits", "test-cnn", settings=cfg)
    assert (s2["done"], s2["skipped"], len(s2["quarantined"])) == (0, 3, 3)
    # fixing a shard (new checksum) gets it processed
    store.write_bytes(layout.raw_key("digits", 3), good)
    s3 = extract_features("digits", "test-cnn", shards="3", settings=cfg)
    assert s3["done"] == 1
