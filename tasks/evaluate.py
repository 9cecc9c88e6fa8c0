"""Evaluation task: one method variant at every requested length, on stored features, over seeds."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from encoders.evaluation import Split, evaluate_seeds
from infra.features import load_features
from infra.registry import RegistryError, coder_card, load_coder
from infra.settings import Settings
from infra.store import shared_store
from tasks.codes import coder_fits_features, coder_id_for
from tasks.stage import logger

GALLERIES = ("all", "no-train")  # every non-query row (METHODS.md) / without the train and val rows


@functools.lru_cache(maxsize=1)
def evaluation_code_version() -> str:
    """Checksum of the code a report's numbers depend on (encoders/*.py and this module): part of
    the report cache key, so a code change never returns old numbers."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted((root / "encoders").glob("*.py")) + [Path(__file__).resolve()]:
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=2)
def _splits(settings: Settings, dataset: str, model_id: str) -> dict[str, Any]:
    data = load_features(shared_store(settings), dataset, model_id)
    return data


def gallery_split(data: dict[str, Any], gallery: str) -> Split:
    """The searched gallery: 'all' (every non-query row) or 'no-train' (train and val rows removed,
    so no code is searched against the rows its coder was fitted on)."""
    db = data["database"]
    if gallery == "all":
        return Split(db.x, db.labels)
    if gallery != "no-train":
        raise ValueError(f"gallery must be one of {GALLERIES}, got {gallery!r}")
    keep = ~np.isin(db.ids, np.concatenate([data["train"].ids, data["val"].ids]))
    return Split(db.x[keep], db.labels[keep])


@task(name="evaluate_method", tags=["heavy"])
def evaluate_method(settings: Settings, dataset: str, model_id: str, variant: str, bits: list[int],
                    R: int | None = None, params: dict[str, Any] | None = None,
                    seeds: list[int] | None = None, gallery: str = "all") -> list[dict[str, Any]]:
    """Rows (small dicts) for `variant` at each of `bits`, mean ± std over `seeds` (default: the
    settings' seed alone). A multi-length coder already registered for these features (e.g. by the
    pipeline's train stage) is reused for the settings' seed, with its recorded fit time. A variant
    that raises gets a row with the reason in `note`, not a failed task."""
    store = shared_store(settings)
    data = _splits(settings, dataset, model_id)
    s = {k: Split(data[k].x, data[k].labels) for k in ("train", "val", "query")}
    seeds = list(seeds or [settings.seed])
    fitted = fitted_s = None
    if variant == "drq" and seeds == [settings.seed] and not params:
        cid = coder_id_for("drq", max(bits), model_id)
        try:
            card = coder_card(store, cid)
            if coder_fits_features(store, dataset, model_id, card):
                fitted, _ = load_coder(store, cid)
                fitted_s = card.get("fit_s")
                logger().info("evaluate drq: reusing registered coder %s", cid)
        except RegistryError:
            pass
    kw = {"fitted": fitted, "fitted_s": fitted_s} if fitted is not None else {}
    rows = evaluate_seeds(variant, bits, s["train"], s["val"], s["query"], gallery_split(data, gallery),
                          seeds=seeds, R=R, params=params, **kw)
    for r in rows:
        logger().info("evaluate %s@%d: mAP %.4f ± %.4f (%d seeds) %s", r.method, r.bits, r.map, r.map_std,
                      r.n_seeds, r.note)
    return [r.as_dict() for r in rows]
