"""Train a backbone on a dataset's train split (selected on val) and register it in the store."""
from __future__ import annotations

from typing import Any

from prefect import flow

from flows.limits import server_tagged
from infra import layout
from infra.runners import SettingsTaskRunner
from infra.settings import Settings
from tasks.train import train_backbone as train_backbone_task


@flow(name="train-backbone", log_prints=True, task_runner=SettingsTaskRunner())
def train_backbone(dataset: str, arch: str = "small-cnn", model_id: str | None = None, epochs: int = 8,
                   classes: list[int] | None = None, force: bool = False,
                   settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register models/<model_id>/ (default id '<dataset>-<arch>'); skipped when it exists."""
    cfg = Settings.load(**(settings or {}))
    model_id = model_id or f"{dataset}-{arch}"
    layout.check_names(dataset=dataset, model=model_id)
    (train,) = server_tagged(train_backbone_task)
    card = train(cfg, dataset, arch, model_id, epochs=epochs, classes=classes, force=force)
    print(f"model {model_id}: {card['arch']}, val accuracy {card.get('val_accuracy', float('nan')):.4f}")
    return card
