"""S3 faults: a fault-injecting proxy (tests/faultproxy.py) in front of the real S3 server.

- moderate fault rate: ingest and extract finish through botocore's and pyarrow's retries, with no
  shard quarantined (a transient fault is not bad input) and nothing lost;
- persistent faults on one shard's input and another's output, past the retry budget: those two
  shards fail with one clear reason naming the key and the cause (never a secret), the others
  finish; once the faults stop a rerun completes;
- throughout, a watcher reading the store directly sees every features / raw shard either absent
  or complete (readable Parquet), and every manifest pointing at an output with its checksum.
"""
from __future__ import annotations

import http.server
import io
import socket
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from flows.extract_features import extract_features
from flows.ingest import ingest
from infra import layout
from infra.manifests import Manifest
from infra.seaweed import DEFAULT_SECRET_KEY
from infra.settings import Settings
from infra.store import StoreError, open_store
from tests.conftest import settings_dict
from tests.faultproxy import FaultProxy
from tests.helpers import register_untrained_cnn
from tests.integration.test_extract_flow import features_by_id

pytestmark = pytest.mark.s3

DIGITS = 1797
FAILING = ("503", "500", "drop_request", "drop_response")


class Watcher(threading.Thread):
    """Polls the store directly (not through the proxy) while a run goes on: every shard object
    under `prefixes` that is visible must be a complete Parquet file, and every manifest's output
    must exist with the manifest's checksum. Violations are collected, not raised."""

    def __init__(self, settings: Settings, prefixes: list[str]):
        super().__init__(daemon=True)
        self.store = open_store(settings)
        self.prefixes = prefixes
        self.checked: dict[str, str] = {}
        self.violations: list[str] = []
        self.polls = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.poll()
            self._done.wait(0.05)
        self.poll()

    def poll(self) -> None:
        self.polls += 1
        for prefix in self.prefixes:
            for info in self.store.list(prefix):
                if self.checked.get(info.key) == info.etag:
                    continue
                try:
                    data = self.store.read_bytes(info.key)
                    if info.key.endswith(".parquet"):
                        pq.read_table(io.BytesIO(data))
                    elif info.key.endswith(".json"):
                        m = Manifest.from_json(data)
                        out = self.store.head(m.output_key)
                        if out is None or out.etag != m.output_checksum:
                            self.violations.append(f"{info.key}: output {m.output_key} missing or changed")
                except Exception as e:  # noqa: BLE001 - a disappearing object is fine, a partial one is not
                    if self.store.head(info.key) is not None:
                        self.violations.append(f"{info.key}: {type(e).__name__}: {e}")
                    continue
                self.checked[info.key] = info.etag

    def stop(self) -> "Watcher":
        self._done.set()
        self.join(30)
        return self


@pytest.fixture
def proxy(seaweed):
    with FaultProxy(seaweed.endpoint, seed=20261125) as p:
        yield p


def through(proxy: FaultProxy, direct: Settings, **overrides) -> dict:
    """`direct`'s settings (flow parameter form) with S3 traffic through the proxy; fault decisions
    ignore the test's random store prefix, so a seed injects the same faults run after run."""
    prefix = "/" + direct.store[len("s3://"):]
    proxy.path_key = lambda path: path.replace(prefix, "", 1)
    return {**settings_dict(direct), "s3_endpoint": proxy.endpoint, "s3_retries": direct.s3_retries,
            **overrides}


def assert_nothing_partial(store, dataset: str, model_id: str) -> None:
    """Every features shard present is complete and has a manifest naming its checksum."""
    for info in store.list(layout.features_prefix(dataset, model_id)):
        part = layout.part_of(info.key)
        pq.read_table(io.BytesIO(store.read_bytes(info.key)))
        m = Manifest.from_json(store.read_bytes(layout.manifest_key("extract", dataset, model_id, part)))
        assert m.output_checksum == info.etag


def assert_content_exact(store, shard_rows: int) -> None:
    """Faults changed no byte that matters: every raw shard equals what ingest builds from the
    package, and every feature equals the model's output recomputed here without the proxy."""
    import torch

    from infra.images import decode_images
    from infra.planner import row_slices
    from infra.registry import load_backbone
    from infra.shards import features_matrix, read_table
    from encoders.backbones import embed_pixels
    from tasks.ingest import load_with_splits, raw_table

    ds, split = load_with_splits("digits", 0)
    backbone, _ = load_backbone(store, "test-cnn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for part, (a, b) in enumerate(row_slices(DIGITS, shard_rows)):
            raw = read_table(store, layout.raw_key("digits", part))
            assert raw.equals(raw_table(ds, split, a, b)), part
            ft = read_table(store, layout.features_key("digits", "test-cnn", part))
            ids = raw.column("id").to_numpy()
            x = embed_pixels(backbone.module, backbone.preprocess,
                             decode_images(raw.column("image").to_pylist(), ids, (28, 28)))
            np.testing.assert_array_equal(ft.column("id").to_numpy(), ids)
            np.testing.assert_allclose(features_matrix(ft), x, rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_ingest_and_extract_finish_under_moderate_faults(prefect_server, s3_settings, proxy):
    """25% of requests meet a fault (503, 500, cut request, cut response, delay): both flows finish,
    nothing is quarantined or lost, no partial shard is ever visible."""
    cfg = through(proxy, s3_settings)
    watcher = Watcher(s3_settings, ["raw/digits/", "features/digits/", "_manifests/"])
    watcher.start()
    proxy.set(rate=0.25)
    try:
        s = ingest("digits", shard_rows=300, settings=cfg)
        register_untrained_cnn(open_store(Settings.load(**cfg)))
        e = extract_features("digits", "test-cnn", settings=cfg)
    finally:
        proxy.set(rate=0)
        watcher.stop()
    assert (s["done"], s["failed"], s["rows"]) == (6, [], DIGITS)
    assert (e["done"], e["failed"], e["quarantined"], e["rows"]) == (6, [], [], DIGITS)
    for kind in FAILING:
        assert proxy.counts[kind] > 0, proxy.counts
    assert proxy.faults >= 15, proxy.counts
    assert watcher.violations == [] and len(watcher.checked) >= 18, watcher.violations
    store = open_store(s3_settings)
    ids, feats = features_by_id(store, "digits", "test-cnn")
    np.testing.assert_array_equal(ids, np.arange(DIGITS))  # nothing lost, nothing twice
    assert np.isfinite(feats).all()
    assert_nothing_partial(store, "digits", "test-cnn")
    assert_content_exact(store, 300)
    print(f"\nmoderate faults: {proxy.requests} requests, {proxy.faults} failed attempts injected "
          f"{dict(proxy.counts)}, {watcher.polls} watcher polls, {len(watcher.checked)} objects checked")


def test_persistent_faults_fail_clearly_then_rerun_completes(prefect_server, s3_settings, proxy):
    """Every request failing stops the flow at its first read with one clear error. Then every read
    of raw part 1 (pyarrow) and every write of features part 2 (boto3) fails, past the retry
    budget: those shards fail naming the key and the cause, are not quarantined, leave nothing
    behind; the other shards finish; after the faults stop a rerun completes."""
    cfg = through(proxy, s3_settings, s3_retries=2)  # a small budget keeps the test short
    ingest("digits", shard_rows=300, settings=cfg)
    register_untrained_cnn(open_store(Settings.load(**cfg)))
    # every request fails: the flow stops at its first read, naming the key and the cause
    proxy.set(rate=1.0, kinds=FAILING)
    with pytest.raises(StoreError) as err:
        extract_features("digits", "test-cnn", settings=cfg)
    assert "models/test-cnn/card.json" in str(err.value) and DEFAULT_SECRET_KEY not in str(err.value)
    assert "\n" not in str(err.value)
    raw1 = layout.raw_key("digits", 1)
    feat2 = layout.features_key("digits", "test-cnn", 2)
    proxy.set(rate=1.0, kinds=FAILING,
              match=lambda method, path: (method == "GET" and path.endswith(raw1))
              or (method == "PUT" and path.endswith(feat2)))
    watcher = Watcher(s3_settings, ["features/digits/", "_manifests/extract/"])
    watcher.start()
    try:
        e = extract_features("digits", "test-cnn", settings=cfg)
    finally:
        watcher.stop()
    injected = proxy.faults
    assert (e["done"], e["quarantined"], len(e["failed"])) == (4, [], 2), e
    reasons = sorted(f["reason"] for f in e["failed"])
    assert any(raw1 in r for r in reasons) and any(feat2 in r for r in reasons), reasons
    causes = ("SlowDown", "InternalError", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
              "NETWORK_CONNECTION", "Connection was closed", "reset by peer", "cut after")
    for r in reasons:
        assert r.startswith("StoreError: ") and "\n" not in r and any(c in r for c in causes), r
        assert DEFAULT_SECRET_KEY not in r
    store = open_store(s3_settings)
    for part in (1, 2):  # nothing half-done: no output, no manifest, no quarantine record
        assert not store.exists(layout.features_key("digits", "test-cnn", part))
        assert not store.exists(layout.manifest_key("extract", "digits", "test-cnn", part))
    assert store.list("_quarantine/") == []
    assert_nothing_partial(store, "digits", "test-cnn")
    assert watcher.violations == [], watcher.violations

    proxy.set(rate=0, match=None)
    again = extract_features("digits", "test-cnn", settings=cfg)
    assert (again["done"], again["skipped"], again["failed"], again["quarantined"]) == (2, 4, [], [])
    ids, _ = features_by_id(store, "digits", "test-cnn")
    np.testing.assert_array_equal(ids, np.arange(DIGITS))
    assert_nothing_partial(store, "digits", "test-cnn")
    print(f"\npersistent faults: {injected} failed attempts injected {dict(proxy.counts)}; failures: {reasons}")


def test_import_stops_rather_than_plan_splits_without_a_shard(prefect_server, s3_settings, proxy):
    """Importing external shards without a split column plans the splits over all of them first.
    A source shard that cannot be read (faults past the budget) stops the run with one clear error,
    instead of planning without it (which would give every shard other splits); after the faults
    stop, the import completes with the splits planned over all rows."""
    from infra import datasets
    from infra.shards import read_table, table_bytes
    from tasks.ingest import load_with_splits, raw_table

    ds, split = load_with_splits("digits", 0)
    direct = open_store(s3_settings)
    for part, (a, b) in enumerate([(0, 600), (600, 1200), (1200, DIGITS)]):
        direct.write_bytes(f"src/part-{part:05d}.parquet", table_bytes(raw_table(ds, split, a, b).drop(["split"])))
    source = s3_settings.store + "/src"
    cfg = through(proxy, s3_settings, s3_retries=2)
    proxy.set(rate=1.0, kinds=FAILING, match=lambda method, path: method == "GET" and path.endswith("src/part-00001.parquet"))
    with pytest.raises(StoreError) as err:
        ingest("ext", source=source, settings=cfg)
    assert "src/part-00001.parquet" in str(err.value) and not direct.list("raw/ext/")
    proxy.set(rate=0, match=None)
    s = ingest("ext", source=source, settings=cfg)
    assert (s["done"], s["failed"], s["quarantined"], s["rows"]) == (3, [], [], DIGITS)
    got = {}
    for part in range(3):
        t = read_table(direct, layout.raw_key("ext", part), columns=["id", "split"])
        got.update(zip(t.column("id").to_pylist(), t.column("split").to_pylist()))
    expected = datasets.assign_splits(ds.labels, np.zeros(DIGITS, bool), seed=0)
    assert [got[i] for i in range(DIGITS)] == list(expected)
    print(f"\nimport faults: {proxy.faults} failed attempts injected {dict(proxy.counts)}")


# -- the proxy itself speaks HTTP/1.1 as both clients need ---------------------------------------
class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the request body; chunked responses for GET /chunked."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    break
                body += chunk
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in (b"hello ", b"chunked ", b"world"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "1234")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_proxy_http11_framing():
    """Keep-alive, Content-Length and chunked bodies both ways, Expect: 100-continue, HEAD, and a
    503 with an S3 XML body, over one client connection."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{server.server_address[1]}") as p:
            s = socket.create_connection(("127.0.0.1", int(p.endpoint.rsplit(":", 1)[1])), timeout=10)
            f = s.makefile("rb")

            def response() -> tuple[int, dict[str, str], bytes]:
                status = int(f.readline().split()[1])
                headers = {}
                while (line := f.readline()) not in (b"\r\n", b""):
                    k, _, v = line.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                if "chunked" in headers.get("transfer-encoding", ""):
                    body = b""
                    while (size := int(f.readline(), 16)):
                        body += f.read(size + 2)[:size]
                    f.readline()
                    return status, headers, body
                return status, headers, f.read(int(headers.get("content-length", 0)))

            s.sendall(b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            assert response()[::2] == (200, b"hello")
            s.sendall(b"PUT /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            assert response()[::2] == (200, b"abcde")
            s.sendall(b"PUT /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            assert f.readline().startswith(b"HTTP/1.1 100") and f.readline() == b"\r\n"
            s.sendall(b"wxyz")
            assert response()[::2] == (200, b"wxyz")
            s.sendall(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
            assert response()[::2] == (200, b"hello chunked world")
            s.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers = int(f.readline().split()[1]), {}
            while (line := f.readline()) != b"\r\n":
                headers[line.split(b":")[0].lower()] = line
            assert status == 200 and b"content-length" in headers  # and no body follows
            p.set(rate=1.0, kinds=("503",))
            s.sendall(b"GET /bucket/key HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = response()
            assert status == 503 and b"<Code>SlowDown</Code>" in body and b"<Resource>/bucket/key</Resource>" in body
            p.set(rate=0)
            s.sendall(b"PUT /d HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
            assert response()[::2] == (200, b"ok")
            s.close()
            assert p.connections == 1 and p.requests == 7 and p.counts == {"503": 1}
            assert p.framing["chunked-request"] == 1 and p.framing["expect-100-continue"] == 1
            assert p.framing["chunked-response"] == 1
    finally:
        server.shutdown()
