"""Evaluation task: one method variant at every requested length, on stored features."""
from __future__ import annotations

import functools
from typing import Any

from prefect import task

from encoders.evaluation import Split, evaluate_variant
from infra.features import load_features
from infra.registry import RegistryError, coder_card, load_coder
from infra.settings import Settings
from infra.store import open_store
from tasks.codes import coder_fits_features, coder_id_for
from tasks.stage import logger


@functools.lru_cache(maxsize=2)
def _splits(settings: Settings, dataset: str, model_id: str) -> dict[str, Split]:
    data = load_features(open_store(settings), dataset, model_id)
    return {k: Split(v.x, v.labels) for k, v in data.items()}


@task(name="evaluate_method", tags=["heavy"])
def evaluate_method(settings: Settings, dataset: str, model_id: str, variant: str, bits: list[int],
                    R: int | None = None, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows (small dicts) for `variant` at each of `bits`. A multi-length coder already registered
    for these features (e.g. by the pipeline's train stage) is reused with its recorded fit time."""
    store = open_store(settings)
    s = _splits(settings, dataset, model_id)
    fitted = fitted_s = None
    if variant == "drq":
        cid = coder_id_for("drq", max(bits), model_id)
        try:
            card = coder_card(store, cid)
            if coder_fits_features(store, dataset, model_id, card):
                fitted, _ = load_coder(store, cid)
                fitted_s = card.get("fit_s")
                logger().info("evaluate drq: reusing registered coder %s", cid)
        except RegistryError:
            pass
    rows = evaluate_variant(variant, bits, s["train"], s["val"], s["query"], s["database"], R=R,
                            seed=settings.seed, params=params, fitted=fitted, fitted_s=fitted_s)
    for r in rows:
        logger().info("evaluate %s@%d: mAP %.4f P@100 %.4f", r.method, r.bits, r.map, r.p_at_100)
    return [r.as_dict() for r in rows]
