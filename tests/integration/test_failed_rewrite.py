"""A failed forced rewrite (disk full) leaves the committed output and manifest exactly as they were
(tasks/stage.py), and an index refresh never publishes a smaller version without a stated reason
(infra/indexes.py check_shrink). The store is real; only chosen writes fail, as a full disk would."""
from __future__ import annotations

import pytest

from flows.build_index import build_index
from flows.extract_features import extract_features
from flows.generate_codes import encode, train_coders
from flows.ingest import ingest
from flows.refresh_index import refresh_index
from infra import indexes as ix
from infra import layout
from infra.store import LocalStore, StoreError, open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn


def snapshot(store, prefixes):
    """{key: bytes} of every object under `prefixes`."""
    return {i.key: store.read_bytes(i.key) for p in prefixes for i in store.list(p)}


def snapshot_of(snap, *prefixes):
    return {k: v for k, v in snap.items() if k.startswith(prefixes)}


def fail_writes(monkeypatch, match):
    """Every LocalStore write of a key containing `match` fails as on a full disk (nothing lands)."""
    real = LocalStore.write_bytes

    def write_bytes(self, key, data):
        if match in key:
            raise StoreError(f"put {self.uri_of(key)} failed: [Errno 28] No space left on device")
        return real(self, key, data)

    monkeypatch.setattr(LocalStore, "write_bytes", write_bytes)


def test_failed_forced_rewrites_keep_committed_work_and_refresh_refuses_to_shrink(
        prefect_server, local_settings, monkeypatch):
    cfg = settings_dict(local_settings)
    store = open_store(local_settings)
    ingest("digits", shard_rows=600, settings=cfg)  # parts 0..2
    register_untrained_cnn(store)
    assert extract_features("digits", "test-cnn", settings=cfg)["done"] == 3
    [card] = train_coders("digits", "test-cnn", {"itq": 16}, settings=cfg)
    coder = card["coder_id"]
    assert encode("digits", "test-cnn", [coder], settings=cfg)[0]["done"] == 3
    built = build_index("digits", coder, 16, "digits-itq", settings=cfg)
    assert (built["status"], built["n"]) == ("published", 1797)  # every item
    committed = snapshot(store, ["features/", "codes/", "_manifests/"])

    # disk full while writing outputs: extract --force and encode --force --shards 0:2 fail ...
    with monkeypatch.context() as m:
        fail_writes(m, "features/digits/")
        s = extract_features("digits", "test-cnn", force=True, settings=cfg)
        assert ([f["part"] for f in s["failed"]], s["done"]) == ([0, 1, 2], 0)  # each failed part named
        assert snapshot(store, ["features/", "_manifests/extract/"]) == snapshot_of(committed, "features/", "_manifests/extract/")
        fail_writes(m, "codes/digits/")
        [s] = encode("digits", "test-cnn", [coder], shards="0:2", force=True, settings=cfg)
        assert ([f["part"] for f in s["failed"]], s["done"]) == ([0, 1], 0)
    # ... and every committed output and manifest is exactly as it was (old code: deleted)
    assert snapshot(store, ["features/", "codes/", "_manifests/"]) == committed

    # the output lands but its manifest cannot be written: the previous output is put back
    with monkeypatch.context() as m:
        fail_writes(m, "_manifests/encode/")
        [s] = encode("digits", "test-cnn", [coder], shards="1", force=True, settings=cfg)
        assert [f["part"] for f in s["failed"]] == [1]
    assert snapshot(store, ["features/", "codes/", "_manifests/"]) == committed
    r = refresh_index("digits-itq", settings=cfg)
    assert (r["status"], r["n"]) == ("up-to-date", 1797)

    # a code shard gone (and its manifest): the refresh refuses to publish fewer items ...
    store.delete(layout.codes_key("digits", coder, 0))
    store.delete(layout.manifest_key("encode", "digits", coder, 0))
    with pytest.raises(ix.IndexBuildError, match="allow_removal"):
        refresh_index("digits-itq", settings=cfg)
    assert ix.read_current(store, "digits-itq").version == built["version"]
    # ... unless the removal is stated, and build.json records why
    r = refresh_index("digits-itq", settings=cfg, allow_removal="part 0 withdrawn")
    assert r["status"] == "published" and 0 < r["n"] < 1597
    assert ix.read_build(store, "digits-itq", r["version"]).removal_reason == "part 0 withdrawn"
