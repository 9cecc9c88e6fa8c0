"""A fault-injecting HTTP/1.1 proxy for an S3 endpoint, for reliability tests (loopback only).

Point `s3_endpoint` at `FaultProxy(upstream).endpoint`: boto3 and pyarrow's S3 client both go
through it. Per request it either forwards faithfully or injects one fault:

- `503` / `500`: answers itself with a proper S3 XML error (`SlowDown` / `InternalError`); the
  upstream never sees the request, so the client's retries are what make the run finish;
- `drop_request`: forwards the headers and half of the body upstream, then cuts both sockets (the
  server must not store a partial object);
- `drop_response`: forwards the whole request, relays the response headers and half of the body,
  then cuts the connection (the server did the work; the client must retry or fail cleanly);
- `delay`: waits `delay_s` before forwarding (slow server, not a failure).

The decision for a request is a pure function of (seed, method, path, how many times this method
and path were seen before), so a run injects the same faults whatever the thread interleaving
(`path_key` maps the path first, e.g. to drop a per-test random prefix).
`match(method, path)` restricts faults to some requests (for example one shard's key).

HTTP handled: keep-alive on both sides, Content-Length and chunked bodies (forwarded verbatim),
`Expect: 100-continue` (answered by the proxy, which then reads the body and forwards the request
without the header), HEAD / 204 / 304 responses without bodies, interim 1xx responses from the
server. Bounded: at most `max_connections` client connections (others wait in the listen queue),
socket timeouts on every read, bodies up to `max_body` bytes. Threads, stdlib only.
"""
from __future__ import annotations

import collections
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

LOG = logging.getLogger(__name__)

KINDS = ("503", "500", "drop_request", "drop_response", "delay")
ERRORS = {
    "503": ("503 Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


class ProxyProtocolError(Exception):
    pass


@dataclass
class _Message:
    """One HTTP request or response head plus its raw body bytes (framing kept as received)."""

    start: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    to_close: bool = False  # response body ran to the end of the connection

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def head_bytes(self, drop: tuple[str, ...] = ()) -> bytes:
        lines = [self.start] + [f"{k}: {v}" for k, v in self.headers if k.lower() not in drop]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class FaultProxy:
    """`with FaultProxy("http://127.0.0.1:8333", rate=0.2, seed=1) as p: ...p.endpoint...`.

    `rate` (0..1) and `match` may be changed while it runs. `counts` holds faults injected by kind;
    `requests` counts every request seen, `forwarded` those relayed to the server."""

    upstream: str
    rate: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    match: Callable[[str, str], bool] | None = None
    path_key: Callable[[str], str] | None = None  # what a decision hashes (e.g. drop a random prefix)
    delay_s: float = 0.2
    max_connections: int = 32
    max_body: int = 256 << 20
    timeout_s: float = 30.0
    counts: collections.Counter = field(default_factory=collections.Counter)
    requests: int = 0
    forwarded: int = 0
    log: list[tuple[str, str, str]] = field(default_factory=list)  # (fault, method, path)
    connections: int = 0  # client connections accepted (fewer than requests: keep-alive works)
    framing: collections.Counter = field(default_factory=collections.Counter)  # expect-100 / chunked seen

    def __post_init__(self) -> None:
        u = urlsplit(self.upstream)
        self._up = (u.hostname or "127.0.0.1", u.port or 80)
        self._lock = threading.Lock()
        self._seen: collections.Counter = collections.Counter()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._socks: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))  # loopback only
        ls.listen(64)
        ls.settimeout(0.2)
        self._listener = ls
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._listener is not None, "start() first"
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def stop(self) -> None:
        self._stopping.set()
        if self._thread:
            self._thread.join(5)
        if self._listener:
            self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            _hard_close(s)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def faults(self) -> int:
        """Faults injected that a client sees as a failed attempt (delays excluded)."""
        return sum(n for k, n in self.counts.items() if k != "delay")

    def set(self, rate: float | None = None, match: Callable[[str, str], bool] | None | str = "keep",
            kinds: tuple[str, ...] | None = None) -> None:
        with self._lock:
            if rate is not None:
                self.rate = rate
            if match != "keep":
                self.match = match  # type: ignore[assignment]
            if kinds is not None:
                self.kinds = kinds

    # -- decisions ---------------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            rate, kinds, match = self.rate, self.kinds, self.match
            if rate <= 0 or (match is not None and not match(method, path)):
                return None
            key = self.path_key(path) if self.path_key else path
            n = self._seen[(method, key)]
            self._seen[(method, key)] += 1
        r = random.Random(f"{self.seed}:{method}:{key}:{n}")
        if r.random() >= rate:
            return None
        kind = kinds[r.randrange(len(kinds))]
        with self._lock:
            self.counts[kind] += 1
            self.log.append((kind, method, path))
        return kind

    # -- plumbing ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                self._slots.release()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, s: socket.socket, add: bool) -> None:
        with self._lock:
            (self._socks.add if add else self._socks.discard)(s)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(self.timeout_s)
        self._track(client, True)
        with self._lock:
            self.connections += 1
        upstream: socket.socket | None = None
        up_reader = None
        reader = client.makefile("rb")
        try:
            while not self._stopping.is_set():
                req = _read_head(reader)
                if req is None:
                    return
                method, target = req.start.split(" ", 2)[:2]
                with self._lock:
                    if (req.header("expect") or "").lower() == "100-continue":
                        self.framing["expect-100-continue"] += 1
                    if "chunked" in (req.header("transfer-encoding") or "").lower():
                        self.framing["chunked-request"] += 1
                path = urlsplit(target).path
                fault = self._decide(method, path)
                expect = (req.header("expect") or "").lower() == "100-continue"
                if fault == "drop_request":
                    if expect:
                        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    _read_body(reader, req, self.max_body)
                    body = req.body[: len(req.body) // 2]
                    try:  # the server sees a request cut mid-body (or after its headers)
                        s = socket.create_connection(self._up, timeout=self.timeout_s)
                        s.sendall(req.head_bytes(drop=("expect",)) + body)
                        _hard_close(s)
                    except OSError:
                        pass
                    return
                if expect:
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                _read_body(reader, req, self.max_body)
                if fault in ERRORS:
                    client.sendall(_error_response(fault, method, target, self.requests))
                    if (req.header("connection") or "").lower() == "close":
                        return
                    continue
                if fault == "delay":
                    time.sleep(self.delay_s)
                resp = None
                while resp is None:  # a kept-alive server socket may have been closed: reopen once
                    fresh = upstream is None
                    if fresh:
                        upstream = socket.create_connection(self._up, timeout=self.timeout_s)
                        self._track(upstream, True)
                        up_reader = upstream.makefile("rb")
                    try:
                        upstream.sendall(req.head_bytes(drop=("expect",)) + req.body)
                        resp = _read_response(up_reader, method, self.max_body)
                    except (OSError, ProxyProtocolError):
                        self._track(upstream, False)
                        _hard_close(upstream)
                        upstream, up_reader = None, None
                        if fresh:
                            raise
                with self._lock:
                    self.forwarded += 1
                if resp.chunked:
                    with self._lock:
                        self.framing["chunked-response"] += 1
                if fault == "drop_response":  # the server did the work; the client sees a cut
                    if resp.body:
                        client.sendall(resp.head_bytes() + resp.body[: len(resp.body) // 2])
                    return
                client.sendall(resp.head_bytes() + resp.body)
                close = any((m.header("connection") or "").lower() == "close" for m in (req, resp))
                if close or resp.to_close:
                    return
        except (OSError, ProxyProtocolError, ValueError) as e:
            LOG.debug("faultproxy connection ended: %s", e)
        finally:
            self._track(client, False)
            _hard_close(client)
            if upstream is not None:
                self._track(upstream, False)
                _hard_close(upstream)
            self._slots.release()


# -- HTTP/1.1 framing ----------------------------------------------------------------------------
def _read_head(f) -> _Message | None:
    start = f.readline(65537)
    while start in (b"\r\n", b"\n"):  # tolerate stray CRLF between messages
        start = f.readline(65537)
    if not start:
        return None
    headers, total = [], 0
    while True:
        line = f.readline(65537)
        if not line:
            raise ProxyProtocolError("connection closed inside headers")
        total += len(line)
        if total > 1 << 20:
            raise ProxyProtocolError("headers too large")
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    return _Message(start.decode("latin-1").rstrip("\r\n"), headers)


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise ProxyProtocolError(f"connection closed after {len(data or b'')} of {n} body bytes")
    return data


def _read_chunked(f, max_body: int) -> bytes:
    """Raw chunked body including its framing and trailers (forwarded verbatim)."""
    out = bytearray()
    while True:
        line = f.readline(65537)
        if not line:
            raise ProxyProtocolError("connection closed inside a chunked body")
        out += line
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while True:  # trailers, up to the blank line
                t = f.readline(65537)
                if not t:
                    raise ProxyProtocolError("connection closed inside chunked trailers")
                out += t
                if t in (b"\r\n", b"\n"):
                    return bytes(out)
        out += _read_exact(f, size + 2)
        if len(out) > max_body:
            raise ProxyProtocolError("body too large")


def _read_body(f, msg: _Message, max_body: int) -> None:
    te = (msg.header("transfer-encoding") or "").lower()
    if "chunked" in te:
        msg.chunked = True
        msg.body = _read_chunked(f, max_body)
        return
    n = int(msg.header("content-length") or 0)
    if n > max_body:
        raise ProxyProtocolError("body too large")
    msg.body = _read_exact(f, n) if n else b""


def _read_response(f, method: str, max_body: int) -> _Message:
    while True:
        resp = _read_head(f)
        if resp is None:
            raise ProxyProtocolError("server closed the connection")
        status = int(resp.start.split(" ", 2)[1])
        if 100 <= status < 200:
            continue  # interim response (we strip Expect, so rare): not relayed
        break
    if method == "HEAD" or status in (204, 304):
        return resp
    if resp.header("content-length") is None and "chunked" not in (resp.header("transfer-encoding") or "").lower():
        resp.body = f.read()  # body runs to the end of the connection
        resp.to_close = True
        return resp
    _read_body(f, resp, max_body)
    return resp


def _error_response(kind: str, method: str, target: str, n: int) -> bytes:
    status, code, message = ERRORS[kind]
    resource = urlsplit(target).path
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
            f"</Message><Resource>{resource}</Resource><RequestId>faultproxy-{n}</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"x-amz-request-id: faultproxy-{n}\r\nServer: faultproxy\r\n\r\n").encode()
    return head if method == "HEAD" else head + body


def _hard_close(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees a reset, as with a dropped connection."""
    try:
        import struct

        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
