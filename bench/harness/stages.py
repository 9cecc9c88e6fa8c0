"""Run pipeline stages as separate `codeshard` CLI processes and measure each one.

Used by bench/glove_scale.py, bench/growth.py and bench/dask_scaling.py. Each stage runs in a
fresh process so its peak RSS is its own (os.wait4 returns the child's rusage: ru_maxrss is the
largest resident set of the child and of any descendant it waited for, e.g. Dask workers), and
its CPU seconds (user + system of the child and its waited-for descendants) are reported beside
wall time, since CPU seconds move less with the load of other people's jobs on the shared cores.

All stage processes talk to one Prefect server (`PrefectServer`), started here unless
PREFECT_API_URL is already set: an ephemeral server per process would add ~10 s to every stage
and its RSS would be counted with the stage's.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.dirname(sys.executable)
OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PREFECT_LOGGING_LEVEL": "WARNING"}


def codeshard_cmd() -> list[str]:
    """The installed `codeshard` entry point of this interpreter's environment."""
    exe = os.path.join(BIN, "codeshard")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "flows.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """`prefect server start` on a free loopback port with a temporary PREFECT_HOME, for the
    duration of a `with` block; sets PREFECT_API_URL in os.environ (children inherit it). Does
    nothing when PREFECT_API_URL is already set. Start-up: ~10-30 s on this machine."""

    def __init__(self, timeout: float = 180.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.home: str | None = None
        self.url = os.environ.get("PREFECT_API_URL")
        self.startup_s = 0.0

    def __enter__(self) -> "PrefectServer":
        if self.url:
            return self
        self.home = tempfile.mkdtemp(prefix="bench-prefect-")
        port = _free_port()
        env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": self.home}
        t0 = time.perf_counter()
        self.log = open(os.path.join(self.home, "server.log"), "wb")
        self.proc = subprocess.Popen([os.path.join(BIN, "prefect"), "server", "start", "--host", "127.0.0.1",
                                      "--port", str(port)], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        while time.perf_counter() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited (rc {self.proc.returncode}); see {self.home}/server.log")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            self.__exit__()
            raise RuntimeError(f"prefect server not healthy after {self.timeout} s")
        self.startup_s = time.perf_counter() - t0
        self.url = url
        self._old_home = os.environ.get("PREFECT_HOME")
        self._env_set = True
        os.environ["PREFECT_API_URL"] = url
        os.environ["PREFECT_HOME"] = self.home
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            if getattr(self, "_env_set", False):
                os.environ.pop("PREFECT_API_URL", None)
                if self._old_home is not None:
                    os.environ["PREFECT_HOME"] = self._old_home
                else:
                    os.environ.pop("PREFECT_HOME", None)
                self._env_set = False
            self.log.close()
        if self.home:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


@dataclass
class StageRun:
    """One stage process: wall seconds, CPU seconds (user+sys incl. waited descendants), peak RSS
    bytes (ru_maxrss), exit status, the JSON it printed (parsed), and the load average before it."""

    name: str
    argv: list[str]
    wall_s: float
    cpu_s: float
    peak_rss: int
    rc: int
    out: Any = None
    load: str = ""
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _parse_json(text: str) -> Any:
    """The JSON document a codeshard command prints last (logs may precede it)."""
    for i, line in enumerate(text.splitlines()):
        if line.startswith("{") or line.startswith("["):
            try:
                return json.loads("\n".join(text.splitlines()[i:]))
            except json.JSONDecodeError:
                continue
    return None


def run_stage(name: str, argv: Sequence[str], env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 1800) -> StageRun:
    """Run one command in a fresh process, wait for it with os.wait4 and return its measurements.
    stdout is parsed as the command's JSON result; stderr is kept (last 2,000 characters)."""
    load = "%.2f %.2f %.2f" % os.getloadavg()
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(list(argv), stdout=out, stderr=err, env=full_env, cwd=REPO)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                p.kill()
                pid, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    run = StageRun(name, list(argv), wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, p.returncode,
                   _parse_json(stdout), load, stderr[-2000:])
    if check and run.rc != 0:
        raise RuntimeError(f"stage {name} failed (rc {run.rc}): {' '.join(argv)}\n{stderr[-3000:]}")
    return run


def cli(*args: str, store: str, extra: Sequence[str] = ()) -> list[str]:
    """argv of `codeshard <args> --store <store> <extra>`."""
    return [*codeshard_cmd(), *args, "--store", store, *extra]


def mib(n: float) -> int:
    return int(round(n / 2**20))


def store_path(store: str) -> str | None:
    return store[len("file://"):] if store.startswith("file://") else None


def fresh_store(store: str) -> None:
    """Remove a local store directory (only under /tmp: never the repo's)."""
    path = store_path(store)
    if path is None:
        return
    if not os.path.abspath(path).startswith("/tmp/"):
        raise ValueError(f"refusing to delete {path}: bench stores live under /tmp")
    shutil.rmtree(path, ignore_errors=True)
