"""Backbone training: read the train/val rows of a dataset's raw shards, train, register the model."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from prefect import task

from infra import layout
from infra.images import decode_images
from infra.planner import select_shards
from infra.registry import RegistryError, model_card, register_model
from infra.settings import Settings
from infra.shards import read_table
from infra.store import Store, shared_store
from tasks.stage import logger


def read_labelled_images(store: Store, dataset: str, splits: Sequence[str], hw: tuple[int, int] = (28, 28),
                         classes: Sequence[int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (ids, pixels (n,H,W) uint8, labels)} for the rows of `splits` (and `classes`).
    Reads every raw shard once; unreadable shards are skipped (the extract stage quarantines them).
    Memory: the selected images only (12,000 x 784 B for Fashion-MNIST train+val)."""
    parts: dict[str, list] = {s: [] for s in splits}
    for ref in select_shards(store.list(layout.raw_prefix(dataset))):
        try:
            t = read_table(store, ref.key, columns=["id", "image", "label", "split"])
        except Exception as e:  # noqa: BLE001 - bad shards are the extract stage's to quarantine
            logger().warning("training skips %s: %s", ref.key, e)
            continue
        split = np.asarray(t.column("split").to_pylist())
        labels = t.column("label").to_numpy(zero_copy_only=False)
        for s in splits:
            keep = split == s
            if classes is not None:
                keep &= np.isin(labels, classes)
            if keep.any():
                rows = np.flatnonzero(keep)
                ids = t.column("id").to_numpy()[rows]
                blobs = t.column("image").take(rows).to_pylist()
                parts[s].append((ids, decode_images(blobs, ids, hw), labels[rows]))
    out = {}
    for s, chunks in parts.items():
        if not chunks:
            raise ValueError(f"dataset {dataset!r} has no rows with split {s!r}"
                             f"{' in classes ' + str(list(classes)) if classes is not None else ''}")
        out[s] = tuple(np.concatenate([c[i] for c in chunks]) for i in range(3))
    return out


@task(name="train_backbone", tags=["heavy"])
def train_backbone(settings: Settings, dataset: str, arch: str, model_id: str, epochs: int = 8,
                   classes: list[int] | None = None, embed_dim: int | None = None,
                   lr: float = 3e-3, force: bool = False) -> dict[str, Any]:
    """Train `arch` (small-cnn / wide-cnn) on split=='train' (best epoch on 'val') and register it
    as models/<model_id>/. Skips when the model exists, unless `force`. Returns the card."""
    from encoders.backbones import ClassifierHead, build_backbone
    from encoders.training import train_classifier

    store = shared_store(settings)
    if not force:
        try:
            card = model_card(store, model_id)
            logger().info("model %s exists (val acc %.3f): skipped", model_id, card.get("val_accuracy", float("nan")))
            return card
        except RegistryError:
            pass
    data = read_labelled_images(store, dataset, ("train", "val"), classes=classes)
    (_, x_tr, y_tr), (_, x_va, y_va) = data["train"], data["val"]
    torch.manual_seed(settings.seed)
    kwargs = {"embed_dim": embed_dim} if embed_dim else {}
    bb = build_backbone(arch, **kwargs)
    n_classes = int(max(y_tr.max(), y_va.max())) + 1
    head = ClassifierHead(bb.feature_dim, n_classes)
    logger().info("training %s on %s: %d train / %d val rows, %d epochs", arch, dataset, len(y_tr), len(y_va), epochs)
    report = train_classifier(bb.module, head, x_tr, y_tr, x_va, y_va, epochs=epochs, lr=lr, seed=settings.seed)
    card = {
        "data": {"dataset": dataset, "train_rows": int(len(y_tr)), "val_rows": int(len(y_va)),
                 "classes": classes if classes is not None else list(range(n_classes))},
        "epochs": epochs, "best_epoch": report.best_epoch, "val_accuracy": report.best_val_accuracy,
        "val_accuracy_per_epoch": report.val_accuracy, "train_seconds": report.seconds,
        "input_hw": [28, 28], "feature_dim": bb.feature_dim, "num_classes": n_classes,
    }
    return register_model(store, model_id, arch, kwargs, bb.module.state_dict(), card,
                          extra={"head.pt": head.state_dict()})
