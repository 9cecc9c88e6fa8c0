"""Loading stored features with their labels and splits (joined by part number and id).

Features part N derives from raw part N, so each features shard is joined with the `id, label,
split` columns of its raw shard only (the image bytes are never read: Parquet column projection).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from infra import layout
from infra.planner import select_shards
from infra.shards import features_matrix, read_table
from infra.store import Store


@dataclass(frozen=True)
class LabelledFeatures:
    """Rows of one split: ids (n,) int64, x (n, D) float32, labels (n,) int64."""

    ids: np.ndarray
    x: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def load_features(store: Store, dataset: str, model_id: str,
                  splits: Sequence[str] = ("train", "val", "query", "database")) -> dict[str, LabelledFeatures]:
    """{split: LabelledFeatures} over every features shard of (dataset, model_id).

    'database' here means the searched gallery: every row whose split is not 'query' (train and
    val rows included), as METHODS.md defines it. Memory: the selected rows' features.
    Raises ValueError when there are no features or a requested split is empty.
    """
    want = set(splits)
    parts: dict[str, list] = {s: [] for s in splits}
    refs = select_shards(store.list(layout.features_prefix(dataset, model_id)))
    if not refs:
        raise ValueError(f"no features for {dataset}/{model_id} in {store.uri}: run `codeshard extract` first")
    for ref in refs:
        ft = read_table(store, ref.key)
        meta = read_table(store, layout.raw_key(dataset, ref.part), columns=["id", "label", "split"])
        ids = ft.column("id").to_numpy()
        order = {int(i): n for n, i in enumerate(meta.column("id").to_numpy())}
        rows = np.fromiter((order[int(i)] for i in ids), dtype=np.int64, count=len(ids))
        labels = meta.column("label").to_numpy(zero_copy_only=False)[rows].astype(np.int64)
        split = np.asarray(meta.column("split").to_pylist(), dtype=object)[rows]
        x = features_matrix(ft)
        for s in want:
            mask = (split != "query") if s == "database" else (split == s)
            if mask.any():
                parts[s].append((ids[mask], x[mask], labels[mask]))
    out = {}
    for s, chunks in parts.items():
        if not chunks:
            raise ValueError(f"{dataset}/{model_id}: no rows with split {s!r}")
        out[s] = LabelledFeatures(*(np.concatenate([c[i] for c in chunks]) for i in range(3)))
    return out
