"""Where the heavy math runs: `resolve_device('cuda')` gives 'cuda' when torch sees a GPU and faiss
was built with GPU support (faiss-gpu), else 'cpu' with one logged line per process saying why and
how to get the GPU build (`make install GPU=1`); `faiss_too=False` asks only about torch (extraction).
faiss on the GPU here: k-means (`kmeans_centroids`, the index build's coarse quantizers) and
brute-force search (`exact_search`). Also how many torch threads a shard task gets
(`shard_threads`, `torch_threads`, `set_torch_threads`).
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

import faiss
import numpy as np

LOG = logging.getLogger(__name__)

KMEANS_SEED = 1234
KMEANS_ITER = 20
_device = "cpu"  # what `use_device` chose for this process


def faiss_gpus() -> int:
    """GPUs faiss can use: 0 for a CPU-only faiss build (faiss-cpu has no get_num_gpus)."""
    fn = getattr(faiss, "get_num_gpus", None)
    try:
        return int(fn()) if fn else 0
    except Exception:  # noqa: BLE001 - a broken CUDA runtime counts as no GPU
        return 0


def torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def resolve_device(asked: str | None, faiss_too: bool = True) -> str:
    """'cuda' if asked for and torch (and, with `faiss_too`, faiss) can use a GPU, else 'cpu', logged
    once per process at WARNING when it falls back: what is missing and the command that installs
    it. Raises ValueError for other names."""
    asked = (asked or "cpu").lower()
    if asked not in ("cpu", "cuda") and not asked.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {asked!r}")
    if asked == "cpu":
        return "cpu"
    checks = [("torch sees no CUDA device", torch_cuda())]
    if faiss_too:
        checks.append(("faiss has no GPU support (faiss-cpu installed)", faiss_gpus() > 0))
    missing = "; ".join(what for what, ok in checks if not ok)
    if missing:
        if (asked, missing) not in _warned:
            _warned.add((asked, missing))
            LOG.warning("--device %s: falling back to CPU: %s. On a GPU machine, `make install GPU=1` "
                        "installs faiss-gpu and CUDA torch", asked, missing)
        return "cpu"
    return asked


_warned: set[tuple[str, str]] = set()  # fallbacks already logged in this process


def use_device(asked: str | None) -> str:
    """Resolve `asked` and make it this process's device for faiss k-means and brute-force search."""
    global _device
    _device = resolve_device(asked)
    return _device


def current_device() -> str:
    return _device


def kmeans_centroids(x: np.ndarray, k: int, spherical: bool = False, device: str | None = None,
                     niter: int = KMEANS_ITER) -> np.ndarray:
    """(k, d) float32 k-means centroids of `x` (seeded, `niter` Lloyd iterations), on the GPU when the
    process device is cuda. Cost: niter · len(x) · k · d flops (faiss subsamples to 256 per centroid)."""
    dev = device or _device
    x = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=KMEANS_SEED, spherical=spherical,
                      gpu=dev.startswith("cuda"), max_points_per_centroid=256, verbose=False)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


@contextmanager
def omp_threads(n: int) -> Iterator[None]:
    """faiss's OpenMP threads set to `n` (>= 1) for the calling thread inside the block, restored after
    (OpenMP's count is per thread: a task's setting must not leak into the next task on that thread)."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def exact_search(x: np.ndarray, q: np.ndarray, k: int, inner_product: bool = False,
                 device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of float queries over `x` (L2 or inner product), on the GPU under cuda."""
    dev = device or _device
    if dev.startswith("cuda"):
        res = faiss.StandardGpuResources()  # pragma: no cover - needs a GPU
        metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
        return faiss.knn_gpu(res, np.ascontiguousarray(q, np.float32), np.ascontiguousarray(x, np.float32),
                             k, metric=metric)
    return faiss.knn(np.ascontiguousarray(q, np.float32), np.ascontiguousarray(x, np.float32), k,
                     metric=faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2)


def shard_threads(max_workers: int) -> int:
    """torch threads for each of `max_workers` concurrent shard tasks: the cores split between them
    (at least 1), so the tasks together use every core without oversubscribing it."""
    return max(1, (os.cpu_count() or 1) // max(1, max_workers))


def set_torch_threads(n: int) -> None:
    """Give the calling thread `n` torch intra-op threads, only if it has another count (a task
    calls this per shard; after the first call in a worker it is one cheap get). With torch's
    OpenMP backend the count is per thread, and threads started afterwards inherit the last one set."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """`n` torch threads for the calling thread and the task threads it starts inside the block,
    restored afterwards (a flow sets it once before fan-out, so a later stage in the same process
    does not inherit 1 thread)."""
    import torch

    before = torch.get_num_threads()
    set_torch_threads(n)
    try:
        yield
    finally:
        set_torch_threads(before)


def describe(device: str) -> dict[str, Any]:
    """What build.json records about the device a build ran on."""
    return {"device": device, "faiss_gpus": faiss_gpus(), "torch_cuda": torch_cuda()}
