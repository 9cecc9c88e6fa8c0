"""infra/catalog.py: what `codeshard ls` shows, read from a real local store."""
from __future__ import annotations

import json

import pytest

from infra import catalog, layout
from infra.manifests import quarantine_shard
from infra.store import open_store


def test_each_kind_lists_what_the_store_holds(local_settings):
    store = open_store(local_settings)
    store.write_bytes(layout.raw_key("mydata", 0), b"x" * 10)
    store.write_bytes(layout.raw_key("mydata", 1), b"x" * 10)
    store.write_bytes(layout.features_key("mydata", "m1", 0), b"f" * 5)
    store.write_bytes(layout.codes_key("mydata", "c1", 0), b"c" * 3)
    store.write_bytes(layout.model_prefix("m1") + "card.json", b"{}")
    store.write_bytes(layout.coder_prefix("c1") + "card.json", b"{}")
    store.write_bytes(layout.index_version_prefix("mydata-c1", 2) + "index.faiss", b"i" * 7)
    store.write_bytes(layout.index_current_key("mydata-c1"), json.dumps({"version": 2}).encode())
    store.write_bytes(layout.index_version_prefix("never", 1) + "index.faiss", b"i")
    quarantine_shard(store, "extract", layout.raw_key("mydata", 1), "empty shard (0 rows)", "etag")

    (ds,) = catalog.list_kind(store, "datasets")
    assert (ds.name, ds.size_bytes) == ("mydata", 10 + 10 + 5 + 3)
    assert "2 raw shards" in ds.detail and "features: m1" in ds.detail and "codes: c1" in ds.detail
    assert [m.name for m in catalog.list_kind(store, "models")] == ["m1"]
    assert [c.name for c in catalog.list_kind(store, "coders")] == ["c1"]
    idx = {e.name: e for e in catalog.list_kind(store, "indexes")}
    assert idx["mydata-c1"].detail.startswith("CURRENT v2") and "never published" in idx["never"].detail
    (q,) = catalog.list_kind(store, "quarantine")
    assert q.name == "extract/raw/mydata/part-00001.parquet" and "empty shard" in q.detail and q.size_bytes == 10
    with pytest.raises(ValueError, match="unknown kind"):
        catalog.list_kind(store, "bogus")


def test_listing_a_missing_store_creates_nothing(tmp_path):
    from infra.settings import Settings

    store = open_store(Settings.load(store=f"file://{tmp_path / 'typo'}"))
    assert catalog.list_kind(store, "indexes") == [] and not (tmp_path / "typo").exists()
    with pytest.raises(ValueError, match="no store at"):
        store.require_existing()
