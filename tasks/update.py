"""Model update tasks, one per step the flow shows: train a candidate, measure its compatibility
matrix (on val to decide, on query to report), decide the gate, record the decision, move the pointer.

Selection rule (issue #16): the gate decides on val queries against the train gallery (train/val
rows only); the query split is measured once, for the reported matrix, and never decides.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from prefect import task

from infra.features import load_features
from infra import layout
from infra.registry import (RegistryError, coder_card, load_backbone, load_coder, load_model_state, model_card,
                            move_pointer, read_pointer, register_model, write_card)
from infra.settings import Settings
from infra.store import Store, shared_store
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


@task(name="train_candidate", tags=["heavy"])
def train_candidate(settings: Settings, dataset: str, old_model_id: str, arch: str, method: str,
                    new_model_id: str, epochs: int = 6, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `arch` with `method` (independent | bct | dual-tuning) so its features are comparable
    with the stored features of `old_model_id` (epoch chosen on val), and register it as a candidate
    (card status 'candidate'; nothing serves it until the flow moves the pointer). Never writes
    gallery features or codes. Cost: training (epochs x train images). Returns the card."""
    from encoders.backbones import ClassifierHead, build_backbone
    from encoders.compat import CompatConfig, train_compatible
    from encoders.selection import selection_record

    store = shared_store(settings)
    old_card = model_card(store, old_model_id)
    old_bb, _ = load_backbone(store, old_model_id)
    old_head = ClassifierHead(old_bb.feature_dim, int(old_card["num_classes"]))
    old_head.load_state_dict(load_model_state(store, old_model_id, "head.pt"))
    imgs = read_labelled_images(store, dataset, ("train", "val"))
    old = load_features(store, dataset, old_model_id, splits=("train", "val"))
    (tr_ids, x_tr, y_tr), (va_ids, x_va, y_va) = imgs["train"], imgs["val"]
    old_tr = _aligned(tr_ids, old["train"].ids, old["train"].x)
    old_va = _aligned(va_ids, old["val"].ids, old["val"].x)
    num_classes = int(max(y_tr.max(), y_va.max())) + 1
    torch.manual_seed(settings.seed)
    new_bb = build_backbone(arch)
    cfg = CompatConfig(epochs=epochs, seed=settings.seed, **(params or {}))
    logger().info("update %s -> %s (%s, %s): %d train rows, %d classes", old_model_id, new_model_id, arch, method,
                  len(y_tr), num_classes)
    t0 = time.perf_counter()
    model, head, report = train_compatible(new_bb.module, new_bb.feature_dim, old_tr, old_head.fc, x_tr, y_tr,
                                           x_va, y_va, num_classes, method=method, config=cfg,
                                           val_old_features=old_va, preprocess=new_bb.preprocess)
    card = {"parent": old_model_id, "method": method, "status": "candidate",
            "data": {"dataset": dataset, "classes": list(range(num_classes))},
            "epochs": epochs, "best_epoch": report.best_epoch, "val_accuracy": report.best_val_accuracy,
            "train_seconds": time.perf_counter() - t0, "feature_dim": old_bb.feature_dim,
            "num_classes": num_classes, "input_hw": old_card.get("input_hw", [28, 28]),
            "projection": {"in_dim": new_bb.feature_dim, "out_dim": old_bb.feature_dim},
            "config": cfg.__dict__, "selection": {**selection_record(method), "epoch": "best val "
                                                  + ("cross-model mAP" if method != "independent" else "top-1")}}
    return register_model(store, new_model_id, arch, {}, model.state_dict(), card,
                          extra={"head.pt": head.state_dict()})


def _rows(imgs, old, split: str):
    ids, px, lab = imgs[split]
    return px, lab, _aligned(ids, old[split].ids, old[split].x)


@task(name="measure_compatibility", tags=["heavy"])
def measure_compatibility(settings: Settings, dataset: str, old_model_id: str, new_model_id: str, split: str,
                          bits: list[int] | None = None) -> dict[str, Any]:
    """The compatibility matrix of a registered candidate on float features (and, for split
    'query', on the old model's DRQ codes at `bits`).

    split 'val': val rows are the queries, train rows the gallery: the numbers the gate decides on.
    split 'query': query rows vs the gallery (every non-query row): reported, never deciding.
    Returns {"split", "matrix": CompatReport, "codes": {bits: matrix dict}}. Cost: embedding the
    queries and gallery with the new model + 3 x nq x ng scoring."""
    from encoders.backbones import embed_pixels
    from encoders.compat import compat_matrix

    store = shared_store(settings)
    new_bb, _ = load_backbone(store, new_model_id)
    if split == "val":
        imgs = read_labelled_images(store, dataset, ("train", "val"))
        old = load_features(store, dataset, old_model_id, splits=("train", "val"))
        q_px, q_lab, q_old = _rows(imgs, old, "val")
        g_px, g_lab, g_old = _rows(imgs, old, "train")
        g_new = embed_pixels(new_bb.module, new_bb.preprocess, g_px)
    elif split == "query":
        imgs = read_labelled_images(store, dataset, ("train", "val", "query", "database"))
        old = load_features(store, dataset, old_model_id, splits=("query", "database"))
        (q_ids, q_px, q_lab), g_parts = imgs["query"], [imgs[s] for s in ("train", "val", "database")]
        q_old = _aligned(q_ids, old["query"].ids, old["query"].x)
        g_lab = np.concatenate([p[2] for p in g_parts])
        g_old = _aligned(np.concatenate([p[0] for p in g_parts]), old["database"].ids, old["database"].x)
        g_new = np.concatenate([embed_pixels(new_bb.module, new_bb.preprocess, p[1]) for p in g_parts])
    else:
        raise ValueError(f"split must be 'val' (decides) or 'query' (reports), got {split!r}")
    q_new = embed_pixels(new_bb.module, new_bb.preprocess, q_px)
    matrix = compat_matrix({"old": q_old, "new": q_new}, {"old": g_old, "new": g_new}, q_lab, g_lab)
    logger().info("compatibility on %s (float features):\n%s", split, matrix.table())
    codes: dict[str, Any] = {}
    if split == "query":
        cid = coder_id_for("drq", max(bits or [64]), old_model_id)
        try:
            coder_card(store, cid)
            codes = _code_matrices(store, cid, q_old, q_new, g_old, g_new, q_lab, g_lab, bits or [16, 32, 64])
        except RegistryError:
            logger().warning("no DRQ coder %s on the old features: code-level matrix skipped", cid)
    return {"split": split, "matrix": matrix, "codes": codes}


@task(name="decide_gate")
def decide_update_gate(val: dict[str, Any], max_flip_rate: float | None):
    """The ship rule on the val matrix (encoders.compat.decide_gate): a GateDecision."""
    from encoders.compat import decide_gate

    return decide_gate(val["matrix"], val["split"], max_flip_rate)


@task(name="record_decision")
def record_decision(settings: Settings, new_model_id: str, decision, reported: dict[str, Any]) -> dict[str, Any]:
    """Write the decision record into the candidate's card: the gate (val numbers), the reported
    query matrix (floats and codes), status 'shipped' or 'refused'. Returns the card."""
    store = shared_store(settings)
    card = model_card(store, new_model_id)
    rep = reported["matrix"]
    rep.max_negative_flip_rate = decision.max_negative_flip_rate
    card.update({"status": "shipped" if decision.passed else "refused", "gate": decision.as_dict(),
                 "gate_passed": decision.passed, "gate_reason": decision.reason, "gate_split": decision.split,
                 "compat_val": {"map": decision.map, "top1": decision.top1,
                                "negative_flip_rate": decision.negative_flip_rate},
                 "compat": {**rep.as_dict(), "split": "query (reported, not deciding)"},
                 "compat_codes": reported["codes"]})
    write_card(store, layout.model_prefix(new_model_id), card)
    return card


@task(name="move_query_model")
def move_query_model(settings: Settings, dataset: str, new_model_id: str, old_model_id: str) -> dict[str, Any]:
    """Point the dataset's query-model pointer at `new_model_id` (conditional write on its ETag)."""
    store = shared_store(settings)
    pointer, etag = read_pointer(store, query_model_pointer(dataset))
    value = {"model_id": new_model_id, "parent": old_model_id, "moved_at": time.time(),
             "previous": (pointer or {}).get("model_id", old_model_id)}
    move_pointer(store, query_model_pointer(dataset), value, etag)
    logger().info("gate passed: query model of %s is now %s", dataset, new_model_id)
    return value
