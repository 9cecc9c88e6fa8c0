"""Store faults and secrets (infra/store*.py, infra/redact.py, infra/settings.py): credentials in
URIs refused and masked, a dead store fails fast (breaker), a read-only store reported, the
original write error kept, object files readable like any other file, search k >= 1."""
from __future__ import annotations

import logging
import os
import stat
import time

import numpy as np
import pytest

from infra.redact import redact
from infra.settings import Settings
from infra.store import LocalStore, StoreError, StoreUnavailable, open_store

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYCANARY"


# -- item 8: credentials inside URIs ----------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("store", f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix"),
    ("s3_endpoint", f"http://admin:{SECRET}@127.0.0.1:8333"),
    ("s3_endpoint", f"https://{SECRET.replace('/', '')}@s3.example.com"),
])
def test_credentials_inside_a_uri_are_refused_without_echoing_them(field, value):
    with pytest.raises(ValueError, match="AWS chain") as e:
        Settings.load(**{"store": "s3://bucket/p", field: value})
    assert SECRET.replace("/", "") not in str(e.value).replace("/", "") and "****@" in str(e.value)
    with pytest.raises(ValueError, match="AWS chain") as e:
        open_store(Settings.load(), uri=f"s3://id:{SECRET}@bucket/source")  # an ingest source
    assert SECRET not in str(e.value)


def test_userinfo_is_masked_in_every_log_record_and_error_text(caplog):
    text = f"failed s3://id:{SECRET}@b/k via http://svc:{SECRET}@host:1/x; see https://example.com/a@b"
    assert SECRET not in redact(text) and "https://example.com/a@b" in redact(text)
    # the logger's own level: the CLI (run in-process by other tests) quiets 'botocore' to WARNING
    with caplog.at_level(logging.INFO, logger="botocore.anything"):
        logging.getLogger("botocore.anything").info("endpoint %s said no", f"http://u:{SECRET}@h:1")
    assert caplog.records and SECRET not in caplog.text and SECRET not in caplog.records[-1].getMessage()


# -- item 9: a store that disappears ------------------------------------------------------------------
def test_a_dead_store_fails_fast_after_consecutive_failures(monkeypatch):
    """Nothing listens on the endpoint: 3 operations fail past their retries, then
    every further one (1,000 shards' first reads) fails at once, naming the store, without a request; a probe after the
    cooldown reaches the network again."""
    cfg = Settings.load(store="s3://gone-bucket/p", s3_endpoint="http://127.0.0.1:9", s3_retries=2,
                        store_breaker=3)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = open_store(cfg)
    sent = []
    store.client.meta.events.register("before-send.s3", lambda **kw: sent.append(1))
    for _ in range(3):
        with pytest.raises(StoreError) as e:
            store.head("raw/x/part-00000.parquet")
        assert not isinstance(e.value, StoreUnavailable)
    per_op = cfg.s3_retries + 1  # botocore's max_attempts counts retries after the first request
    assert len(sent) == 3 * per_op
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="store s3://gone-bucket/p is unavailable"):
        open_store(cfg).head("raw/x/part-00001.parquet")  # every Store on that store shares the breaker
    for _ in range(1000):  # 1,000 shards' first reads
        with pytest.raises(StoreUnavailable, match="store s3://gone-bucket/p is unavailable"):
            store.head("raw/x/part-00001.parquet")
    assert len(sent) == 3 * per_op and time.monotonic() - t0 < 5
    store.breaker.cooldown_s = 0.0
    with pytest.raises(StoreError):
        store.head("raw/x/part-00002.parquet")  # the probe: one more real operation
    assert len(sent) == 4 * per_op


def test_the_breaker_closes_on_an_answer_and_tasks_do_not_retry_it():
    from infra.store_breaker import StoreBreaker
    from tasks.stage import is_store_error

    b = StoreBreaker("s3://b/p", threshold=2)
    b.failed()
    b.succeeded()  # an answer (even a 404) resets the count
    b.failed()
    b.before()
    b.failed()
    with pytest.raises(StoreUnavailable):
        b.before()

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert is_store_error(None, None, State(StoreError("put failed: 503")))
    assert not is_store_error(None, None, State(StoreUnavailable("store s3://b/p is unavailable")))


# -- item 10: read-only store, cleanup errors, permissions, k ------------------------------------------
def _read_only(monkeypatch):
    """A read-only store even for root: every write and delete fails with EROFS."""
    def refuse(*a, **kw):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    monkeypatch.setattr("pathlib.Path.unlink", refuse)


def test_check_reports_a_read_only_store_instead_of_crashing(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    _read_only(monkeypatch)
    with pytest.raises(StoreError, match=r"put file://.*_health/probe failed: \[Errno 30\] Read-only"):
        store.check()
    with pytest.raises(StoreError, match="delete .* failed"):
        store.delete("a/b.txt")


def test_a_cleanup_error_does_not_hide_the_write_error(tmp_path, monkeypatch, caplog):
    """The output write fails (disk full), then removing the leftovers fails (read-only): the task
    raises the write error, and the cleanup error is logged beside it."""
    from infra.planner import ShardRef
    from infra.shards import features_table, write_table
    from tasks.stage import run_shard_stage

    store = LocalStore(tmp_path / "store")
    write_table(store, "raw/d/part-00000.parquet", features_table(np.arange(3), np.ones((3, 2))))
    head = store.head("raw/d/part-00000.parquet")
    real = LocalStore.write_bytes

    def full(self, key, data):
        if key.startswith("features/"):
            raise StoreError(f"put {self.uri_of(key)} failed: [Errno 28] No space left on device")
        return real(self, key, data)

    monkeypatch.setattr(LocalStore, "write_bytes", full)
    monkeypatch.setattr(LocalStore, "delete", lambda self, key: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(StoreError, match="No space left"):
        run_shard_stage(store, stage="extract", dataset="d", output_id="m",
                        ref=ShardRef("raw/d/part-00000.parquet", 0, head.etag, head.size),
                        output_key="features/d/m/part-00000.parquet", code_version="v", force=False,
                        work=lambda: (features_table(np.arange(3), np.ones((3, 2))), {}))
    assert "could not remove" in caplog.text and "No space left" in caplog.text


def test_local_objects_get_the_umask_permissions(tmp_path):
    from infra.store_local import FILE_MODE

    store = LocalStore(tmp_path / "store")
    store.write_bytes("raw/d/part-00000.parquet", b"x")
    mode = stat.S_IMODE((store.root / "raw/d/part-00000.parquet").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == FILE_MODE == 0o666 & ~umask  # 0644 under 022; mkstemp alone gives 0600
    assert mode & 0o040 or umask & 0o040  # group-readable unless the umask says otherwise


def test_search_refuses_k_below_one():
    from infra.search import check_k

    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            check_k(bad)
    check_k(1)
