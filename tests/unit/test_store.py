"""infra.store on both backends: atomic writes, listing, ETags, conditional writes, errors."""
from __future__ import annotations

import concurrent.futures as cf

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.shards import table_bytes
from infra.store import PreconditionFailed, StoreError, open_store


def test_roundtrip_list_delete(any_settings):
    st = open_store(any_settings)
    e1 = st.write_bytes("a/b/one.bin", b"1")
    st.write_bytes("a/two.bin", b"22")
    assert st.read_bytes("a/b/one.bin") == b"1"
    assert [i.key for i in st.list("a/")] == ["a/b/one.bin", "a/two.bin"]
    assert st.head("a/two.bin").size == 2
    assert st.head("a/b/one.bin").etag == e1
    assert st.head("missing") is None
    st.delete("a/two.bin")
    assert [i.key for i in st.list("a/")] == ["a/b/one.bin"]
    with pytest.raises(StoreError, match="no object"):
        st.read_bytes("a/two.bin")


def test_etag_changes_with_content(any_settings):
    st = open_store(any_settings)
    e1 = st.write_bytes("k", b"x")
    e2 = st.write_bytes("k", b"y")
    assert e1 != e2 and st.head("k").etag == e2


def test_conditional_writes(any_settings):
    st = open_store(any_settings)
    e1 = st.put_if("p/CURRENT", b"v1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        st.put_if("p/CURRENT", b"v1-again", if_none_match=True)
    e2 = st.put_if("p/CURRENT", b"v2", if_match=e1)
    with pytest.raises(PreconditionFailed):
        st.put_if("p/CURRENT", b"v3", if_match=e1)  # stale ETag
    assert st.read_with_etag("p/CURRENT") == (b"v2", e2)


def test_conditional_race_has_one_winner(any_settings):
    st = open_store(any_settings)
    base = st.put_if("race/CURRENT", b"v0", if_none_match=True)

    def attempt(i):
        try:
            open_store(any_settings).put_if("race/CURRENT", f"w{i}".encode(), if_match=base)
            return i
        except PreconditionFailed:
            return None

    with cf.ThreadPoolExecutor(8) as ex:
        winners = [w for w in ex.map(attempt, range(8)) if w is not None]
    assert len(winners) == 1
    assert st.read_bytes("race/CURRENT") == f"w{winners[0]}".encode()


def test_streaming_parquet_and_read_counts(any_settings):
    st = open_store(any_settings)
    before = st.write_count("t/")
    st.write_bytes("t/part-00000.parquet", table_bytes(pa.table({"x": list(range(100))})))
    assert st.write_count("t/") == before + 1
    reads = st.read_count("t/part-00000.parquet")
    assert pq.ParquetFile(st.open_input("t/part-00000.parquet")).read().num_rows == 100
    assert open_store(any_settings).read_count("t/part-00000.parquet") == reads + 1


def test_invalid_key_and_uri(local_settings):
    st = open_store(local_settings)
    with pytest.raises(StoreError):
        st.write_bytes("../escape", b"x")
    with pytest.raises(StoreError, match="unsupported store URI"):
        open_store(local_settings, uri="gs://nope")


def test_missing_bucket_is_a_clear_error(seaweed):
    from infra.settings import Settings

    st = open_store(Settings.load(store="s3://no-such-bucket-xyz/p", s3_endpoint=seaweed.endpoint, s3_retries=1))
    # SeaweedFS creates a bucket on first PUT (AWS does not), so check the read paths.
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        st.list("")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-xyz' does not exist"):
        st.check()


def test_wrong_credentials_error_has_no_secret(seaweed, monkeypatch):
    from infra.settings import Settings

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "totally-wrong-secret-123")
    st = open_store(Settings.load(store=f"s3://{seaweed.bucket}/p", s3_endpoint=seaweed.endpoint, s3_retries=1))
    with pytest.raises(StoreError) as info:
        st.write_bytes("k", b"x")
    assert "SignatureDoesNotMatch" in str(info.value) or "AccessDenied" in str(info.value)
    assert "totally-wrong-secret-123" not in str(info.value)


def test_unreachable_store_is_a_clear_error():
    from infra.settings import Settings
    from infra.seaweed import free_port

    st = open_store(Settings.load(store="s3://b/p", s3_endpoint=f"http://127.0.0.1:{free_port()}", s3_retries=1))
    with pytest.raises(StoreError, match="Could not connect|connect"):
        st.write_bytes("k", b"x")
