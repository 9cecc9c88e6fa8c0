"""Model update task: train a new encoder against the stored gallery's model, measure, gate, ship."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from prefect import task

from infra.features import load_features
from infra.registry import (RegistryError, coder_card, load_backbone, load_coder, load_model_state, model_card,
                            move_pointer, read_pointer, register_model)
from infra.settings import Settings
from infra.store import Store, open_store
from tasks.codes import coder_id_for
from tasks.stage import logger
from tasks.train import read_labelled_images


def query_model_pointer(dataset: str) -> str:
    """Name of the pointer that says which model embeds new queries and new items of `dataset`."""
    return f"query-model-{dataset}"


def _aligned(ids: np.ndarray, feats_ids: np.ndarray, feats: np.ndarray) -> np.ndarray:
    pos = {int(i): n for n, i in enumerate(feats_ids)}
    missing = [int(i) for i in ids if int(i) not in pos]
    if missing:
        raise ValueError(f"{len(missing)} rows have no stored old features (first id {missing[0]}): "
                         "extract the gallery with the old model first")
    return feats[np.fromiter((pos[int(i)] for i in ids), dtype=np.int64, count=len(ids))]


def _code_matrices(store: Store, coder_id: str, q_old, q_new, g_old, g_new, q_labels, g_labels,
                   bits: list[int]) -> dict[str, Any]:
    """The compatibility matrix on codes of the coder trained on OLD features, at each length:
    old/new queries encoded with that coder, searched against the old gallery's codes."""
    from encoders.compat import code_compat_matrix

    coder, _ = load_coder(store, coder_id)
    g_old_codes, g_new_codes = coder.encode(g_old), coder.encode(g_new)
    out = {}
    for b in [b for b in bits if b in coder.lengths]:
        rep = code_compat_matrix(coder, b, {"old": q_old, "new": q_new},
                                 {"old": g_old_codes, "new": g_new_codes}, q_labels, g_labels)
        out[str(b)] = rep.as_dict()
    return out


@task(name="update_model", tags=["heavy"])
def update_model_task(settings: Settings, dataset: str, old_model_id: str, arch: str, method: str,
                      new_model_id: str, epochs: int = 6, bits: list[int] | None = None,
                      params: dict[str, Any] | None = None,
                      max_flip_rate: float | None = None) -> dict[str, Any]:
    """Train `arch` with `method` (independent | bct | dual-tuning) so its features are comparable
    with the stored features of `old_model_id`; measure the float and code compatibility matrices
    on query vs database; register the new model with its card; move the dataset's query-model
    pointer only if the gate passes (mAP cells, and negative flips <= `max_flip_rate` when given).
    Never writes gallery features or codes.
    Cost: training (epochs x 10k images) + embedding the query and database images once."""
    from encoders.backbones import build_backbone, ClassifierHead
    from encoders.compat import CompatConfig, compat_matrix, train_compatible

    store = open_store(settings)
    log = logger()
    old_card = model_card(store, old_model_id)
    old_bb, _ = load_backbone(store, old_model_id)
    old_head = ClassifierHead(old_bb.feature_dim, int(old_card["num_classes"]))
    old_head.load_state_dict(load_model_state(store, old_model_id, "head.pt"))

    imgs = read_labelled_images(store, dataset, ("train", "val", "query", "database"))
    old = load_features(store, dataset, old_model_id, splits=("train", "val", "query", "database"))
    (tr_ids, x_tr, y_tr), (va_ids, x_va, y_va) = imgs["train"], imgs["val"]
    old_tr = _aligned(tr_ids, old["train"].ids, old["train"].x)
    old_va = _aligned(va_ids, old["val"].ids, old["val"].x)
    num_classes = int(max(y_tr.max(), y_va.max())) + 1

    torch.manual_seed(settings.seed)
    new_bb = build_backbone(arch)
    cfg = CompatConfig(epochs=epochs, seed=settings.seed, **(params or {}))
    log.info("update %s -> %s (%s, %s): %d train rows, %d classes", old_model_id, new_model_id, arch, method,
             len(y_tr), num_classes)
    t0 = time.perf_counter()
    model, head, report = train_compatible(new_bb.module, new_bb.feature_dim, old_tr, old_head.fc, x_tr, y_tr,
                                           x_va, y_va, num_classes, method=method, config=cfg,
                                           val_old_features=old_va, preprocess=new_bb.preprocess)
    train_s = time.perf_counter() - t0

    # the gallery = every non-query row; its new features are computed for measurement only
    from encoders.backbones import embed_pixels

    (q_ids, q_px, q_lab), g_parts = imgs["query"], [imgs[s] for s in ("train", "val", "database")]
    g_ids = np.concatenate([p[0] for p in g_parts])
    g_lab = np.concatenate([p[2] for p in g_parts])
    q_new = embed_pixels(model, new_bb.preprocess, q_px)
    g_new = np.concatenate([embed_pixels(model, new_bb.preprocess, p[1]) for p in g_parts])
    q_old = _aligned(q_ids, old["query"].ids, old["query"].x)
    g_old = _aligned(g_ids, old["database"].ids, old["database"].x)
    matrix = compat_matrix({"old": q_old, "new": q_new}, {"old": g_old, "new": g_new}, q_lab, g_lab)
    matrix.max_negative_flip_rate = max_flip_rate
    passed, reason = matrix.gate()
    log.info("compatibility (float features):\n%s\n%s", matrix.table(), reason)

    codes = {}
    cid = coder_id_for("drq", max(bits or [64]), old_model_id)
    try:
        coder_card(store, cid)
        codes = _code_matrices(store, cid, q_old, q_new, g_old, g_new, q_lab, g_lab, bits or [16, 32, 64])
    except RegistryError:
        log.warning("no DRQ coder %s on the old features: code-level matrix skipped", cid)

    card = {"parent": old_model_id, "method": method, "data": {"dataset": dataset, "classes": list(range(num_classes))},
            "epochs": epochs, "best_epoch": report.best_epoch, "val_accuracy": report.best_val_accuracy,
            "train_seconds": train_s, "feature_dim": old_bb.feature_dim, "num_classes": num_classes,
            "input_hw": old_card.get("input_hw", [28, 28]),
            "projection": {"in_dim": new_bb.feature_dim, "out_dim": old_bb.feature_dim},
            "compat": matrix.as_dict(), "compat_codes": codes, "gate_passed": passed, "gate_reason": reason}
    card = register_model(store, new_model_id, arch, {}, model.state_dict(), card,
                          extra={"head.pt": head.state_dict()})

    pointer, etag = read_pointer(store, query_model_pointer(dataset))
    if passed:
        move_pointer(store, query_model_pointer(dataset),
                     {"model_id": new_model_id, "parent": old_model_id, "moved_at": time.time(),
                      "previous": (pointer or {}).get("model_id", old_model_id)}, etag)
        log.info("gate passed: query model of %s is now %s", dataset, new_model_id)
    else:
        log.warning("gate refused %s: %s; query model of %s unchanged (%s)", new_model_id, reason, dataset,
                    (pointer or {}).get("model_id", old_model_id))
    return {k: card[k] for k in ("model_id", "parent", "method", "gate_passed", "gate_reason", "compat",
                                 "compat_codes", "val_accuracy", "train_seconds")}
