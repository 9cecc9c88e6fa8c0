"""Shared mechanics of the bench/*.py scripts: machine line, interleaved timing, peak RSS, tables.

Not a benchmark itself (a package, so `make bench`'s `bench/*.py` glob skips it). The scripts put
`bench/` on sys.path by being run as `python bench/X.py` and import this as `harness`.

The machine is shared (2 cores, other people's jobs), so absolute numbers drift by 2x within
minutes: every comparison here is a ratio of two sides timed alternately (A, B, A, B, ...) in one
process, reported as medians, with the load average printed beside the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable, Sequence

import psutil


# -- machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_avg() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def machine_line() -> str:
    """One line: CPU model, cores, date (UTC), python; printed above every table."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"machine: {cpu_model()}, {os.cpu_count()} cores (shared), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, python {platform.python_version()}, {now}")


def threads_line() -> str:
    import faiss
    import torch

    return f"threads: torch {torch.get_num_threads()}, faiss omp {faiss.omp_get_max_threads()}"


def set_threads(n: int) -> None:
    """n > 0: torch, faiss and numpy's BLAS all use n threads; 0 leaves the libraries' defaults."""
    if n <= 0:
        return
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def command_line() -> str:
    return ".venv/bin/python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


# -- devices --------------------------------------------------------------------------------------
def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: torch on the GPU (and faiss-gpu where importable); exits 0 without one")


def require_device(device: str) -> None:
    """With --device cuda and no GPU: print 'cuda not available' and exit 0 (the CPU run is the test)."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        print("cuda not available")
        sys.exit(0)


def faiss_gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# -- timing ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(sides: dict[str, Callable[[], object]], reps: int,
               warmup: bool = True) -> dict[str, list[float]]:
    """Run every side once per round, rounds repeated `reps` times (A, B, A, B, ...); seconds per call.
    `warmup` runs each side once first, untimed (caches, lazy inits, BLAS thread pools)."""
    if warmup:
        for fn in sides.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            out[name].append(timed(fn))
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """'min-max' of a sample, to show how noisy a median is."""
    return f"{min(xs):.3g}-{max(xs):.3g}"


class PeakRss:
    """Context manager sampling this process's RSS every `interval` s; `.peak` in bytes afterwards.
    A sampler, not ru_maxrss: ru_maxrss is a process-lifetime high-water mark and cannot tell two
    phases of one run apart. Misses spikes shorter than `interval`."""

    def __init__(self, interval: float = 0.02, children: bool = False) -> None:
        self.interval = interval
        self.children = children
        self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        rss = self._proc.memory_info().rss
        if self.children:
            for c in self._proc.children(recursive=True):
                try:
                    rss += c.memory_info().rss
                except psutil.Error:
                    pass
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRss":
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.0f}"


# -- output ---------------------------------------------------------------------------------------
def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A GitHub-markdown table, columns padded for reading in a terminal too."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c == 0:
            return "0"
        if abs(c) >= 100:
            return f"{c:,.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3g}"
    return str(c)


def header(title: str) -> None:
    print(f"## {title}")
    print(machine_line())
    print(f"command: {command_line()}")
