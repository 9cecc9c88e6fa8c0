"""Shard schemas and validation: each bad input gets a one-line reason."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from infra.manifests import Manifest, done_manifest, list_quarantine, quarantine_reason, quarantine_shard, write_manifest
from infra.shards import (ShardInvalid, codes_matrix, codes_table, features_matrix, features_table, read_table,
                          normalise_raw, validate_codes, validate_features, validate_raw, write_table)
from infra.store import open_store


def raw(**cols):
    base = {"id": pa.array([1, 2, 3], pa.int64()), "image": pa.array([b"a", b"b", b"c"])}
    base.update(cols)
    return pa.table({k: v for k, v in base.items() if v is not None})


def test_valid_raw_passes():
    validate_raw("k", raw(label=pa.array([0, 1, 0], pa.int32()), split=pa.array(["train", "query", "val"])))


@pytest.mark.parametrize("table,match", [
    (raw(id=pa.array([1, 1, 2], pa.int64())), "duplicate ids"),
    (raw(image=None), "needs an 'image' or 'text'"),
    (pa.table({"image": [b"x"]}), "missing column 'id'"),
    (raw(id=pa.array(["a", "b", "c"])), "column 'id' has type string"),
    (raw(split=pa.array(["train", "nope", "val"])), "unknown split"),
    (raw().slice(0, 0), "empty shard"),
    (raw(label=pa.array([0, None, 1], pa.int32())), r"1 null labels \(first id 2\): every row needs a class label"),
    (raw(split=pa.array(["train", None, "val"])), r"1 null splits \(first id 2\)"),
])
def test_bad_raw(table, match):
    with pytest.raises(ShardInvalid, match=match):
        validate_raw("raw/d/part-00000.parquet", table)


def test_features_roundtrip_and_validation(local_settings):
    st = open_store(local_settings)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    t = features_table(np.arange(5), x)
    write_table(st, "f.parquet", t)
    back = read_table(st, "f.parquet")
    np.testing.assert_array_equal(features_matrix(back), x)
    validate_features("f", back, dim=4)
    with pytest.raises(ShardInvalid, match="dimension 4, expected 8"):
        validate_features("f", back, dim=8)
    x[2, 1] = np.nan
    with pytest.raises(ShardInvalid, match="NaN/Inf.*first id 2"):
        validate_features("f", features_table(np.arange(5), x))


def test_codes_roundtrip():
    c = np.random.default_rng(0).integers(0, 256, size=(7, 3), dtype=np.uint8)
    t = codes_table(np.arange(7), c)
    validate_codes("c", t, nbytes=3)
    np.testing.assert_array_equal(codes_matrix(t), c)
    np.testing.assert_array_equal(codes_matrix(t.slice(2, 3)), c[2:5])


def test_truncated_parquet_is_invalid(local_settings):
    st = open_store(local_settings)
    write_table(st, "good.parquet", raw())
    st.write_bytes("bad.parquet", st.read_bytes("good.parquet")[:40])
    with pytest.raises(ShardInvalid, match="not a readable Parquet"):
        read_table(st, "bad.parquet")


def test_manifest_done_and_quarantine(local_settings):
    st = open_store(local_settings)
    etag = st.write_bytes("out/part-00000.parquet", b"data")
    m = Manifest("extract", "d", 0, "raw/d/part-00000.parquet", "in1", 3, "out/part-00000.parquet", etag, "v1")
    write_manifest(st, "_manifests/x.json", m)
    assert done_manifest(st, "_manifests/x.json", "in1", "v1") == m
    assert done_manifest(st, "_manifests/x.json", "in2", "v1") is None  # input changed
    assert done_manifest(st, "_manifests/x.json", "in1", "v2") is None  # model changed
    st.write_bytes("out/part-00000.parquet", b"tampered")
    assert done_manifest(st, "_manifests/x.json", "in1", "v1") is None  # output changed
    st.write_bytes("raw/d/part-00001.parquet", b"garbage")
    q = quarantine_shard(st, "extract", "raw/d/part-00001.parquet", "not parquet", "c1")
    assert st.read_bytes(q) == b"garbage" and st.exists("raw/d/part-00001.parquet")
    assert quarantine_reason(st, "extract", "raw/d/part-00001.parquet", "c1") == "not parquet"
    assert quarantine_reason(st, "extract", "raw/d/part-00001.parquet", "c2") is None
    assert [r["key"] for r in list_quarantine(st)] == ["raw/d/part-00001.parquet"]


@pytest.mark.parametrize("table,match", [
    (raw(id=pa.array([1, 2**63 + 5, 3], pa.uint64())), "column 'id' .uint64. has a value int64 cannot hold"),
    (raw(label=pa.array([0, 2**40, 1], pa.int64())), "column 'label' .int64. has a value int32 cannot hold"),
])
def test_values_the_raw_schema_cannot_hold_are_bad_data(table, match):
    """An out-of-range id or label is the shard's fault (ShardInvalid: quarantined, not retried as a
    store fault the way a bare ArrowInvalid was)."""
    validate_raw("src/part-00000.parquet", table)  # the types are integer: only the cast can tell
    with pytest.raises(ShardInvalid, match=match):
        normalise_raw("src/part-00000.parquet", table)


def test_normalise_raw_casts_and_drops_extra_columns():
    t = normalise_raw("k", raw(id=pa.array([1, 2, 3], pa.uint32()), label=pa.array([0, 1, 0], pa.int64()),
                               extra=pa.array([1, 2, 3])))
    assert t.schema.names == ["id", "image", "label"]
    assert t.schema.field("id").type == pa.int64() and t.schema.field("label").type == pa.int32()


def test_quarantine_under_a_name_keeps_two_sources_apart(local_settings):
    """Two import sources with the same relative key get separate records (item 10)."""
    st, a, b = (open_store(local_settings, uri=f"{local_settings.store}/{d}") for d in ("dst", "a", "b"))
    a.write_bytes("part-00000.parquet", b"A")
    b.write_bytes("part-00000.parquet", b"B")
    qa = quarantine_shard(st, "import", "part-00000.parquet", "bad A", "ca", source=a, name="ds1/sa/part-00000.parquet")
    qb = quarantine_shard(st, "import", "part-00000.parquet", "bad B", "cb", source=b, name="ds2/sb/part-00000.parquet")
    assert (st.read_bytes(qa), st.read_bytes(qb)) == (b"A", b"B")
    assert quarantine_reason(st, "import", "ds1/sa/part-00000.parquet", "ca") == "bad A"
    assert quarantine_reason(st, "import", "ds2/sb/part-00000.parquet", "cb") == "bad B"
