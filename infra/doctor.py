"""`codeshard doctor`'s checks: what this machine and the configured store can do, one line each.

Nothing here raises: every check reports. The store check never creates a store: an empty or
missing one is reported as such and not written to.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from infra.settings import Settings


@dataclass(frozen=True)
class Check:
    """One line of `doctor`: `required` checks decide its exit code."""

    name: str
    ok: bool
    detail: str
    required: bool = True


def checks(settings: Settings) -> list[Check]:
    """Every check, in the order `doctor` prints them. Cost: imports torch and faiss; one LIST
    plus a probe write/read/delete on the store (skipped when it holds nothing); one Prefect
    health call."""
    return [_torch(settings), _faiss(), _data(), _weed(), *_store(settings), _prefect()]


def _torch(settings: Settings) -> Check:
    try:
        import torch

        cuda = torch.cuda.is_available()
        gpus = torch.cuda.device_count() if cuda else 0
        wanted = settings.device == "cuda"
        detail = f"torch {torch.__version__}, CUDA {'available, ' + str(gpus) + ' GPU(s)' if cuda else 'not available'}"
        if wanted and not cuda:
            return Check("torch", False, detail + " — but --device cuda was asked for")
        return Check("torch", True, detail + f"; device {settings.torch_device()}")
    except Exception as e:  # noqa: BLE001 - doctor reports, never crashes
        return Check("torch", False, f"{type(e).__name__}: {e}")


def _faiss() -> Check:
    try:
        import faiss

        from infra.devices import faiss_gpus

        gpus = faiss_gpus()
        return Check("faiss", True, f"faiss {faiss.__version__}, {gpus} GPU(s) visible to faiss")
    except Exception as e:  # noqa: BLE001
        return Check("faiss", False, f"{type(e).__name__}: {e}")


def _data() -> Check:
    from infra import datasets

    have = {"fashion-mnist": os.path.isdir(datasets.FASHION_MNIST_ROOT),
            "wordnet": os.path.isdir(datasets.WORDNET_ROOT)}
    try:
        import sklearn.datasets  # noqa: F401 - digits ships inside scikit-learn

        have["digits"] = True
    except ImportError:
        have["digits"] = False
    missing = [k for k, v in have.items() if not v]
    detail = "packaged datasets: " + ", ".join(f"{k} {'yes' if v else 'MISSING'}" for k, v in have.items())
    if missing:
        detail += " (Debian packages dataset-fashion-mnist, wordnet-base: `make data`)"
    return Check("data", not missing, detail, required=False)


def _weed() -> Check:
    try:
        from infra.seaweed import weed_binary

        return Check("weed", True, f"SeaweedFS binary {weed_binary()} (for `codeshard dev s3`)", required=False)
    except Exception as e:  # noqa: BLE001
        return Check("weed", False, f"{e}", required=False)


def _store(settings: Settings) -> list[Check]:
    from infra import catalog
    from infra.store import StoreError, open_store

    try:
        store = open_store(settings)
        if not store.holds_anything():
            return [Check("store", True, f"{store.uri}: empty or not created yet (the first ingest creates it); "
                                         f"nothing was written")]
        status = store.check()
        counts = ", ".join(f"{len(catalog.list_kind(store, k))} {k}" for k in catalog.KINDS)
        return [Check("store", True, status), Check("holds", True, counts)]
    except (StoreError, ValueError, OSError) as e:
        from infra.store import clean_error

        return [Check("store", False, clean_error(e))]


def _prefect() -> Check:
    try:
        import anyio
        from prefect.client.orchestration import get_client

        async def _health():
            async with get_client() as c:
                return await c.api_healthcheck()

        err = anyio.run(_health)
        where = os.environ.get("PREFECT_API_URL", "temporary local server")
        return Check("prefect", err is None, f"{'ok' if err is None else err} ({where})")
    except Exception as e:  # noqa: BLE001
        return Check("prefect", False, f"{type(e).__name__}: {e}")
