"""Small helpers shared by integration tests (no fixtures here)."""
from __future__ import annotations

import torch

from infra.registry import register_model
from infra.store import Store


def register_untrained_cnn(store: Store, model_id: str = "test-cnn", seed: int = 0) -> dict:
    """Register a randomly initialised SmallCNN: real weights, deterministic, no training cost.
    Mechanics tests use it; quality tests train for real."""
    from encoders.backbones import build_backbone

    torch.manual_seed(seed)
    bb = build_backbone("small-cnn", embed_dim=32)
    return register_model(store, model_id, "small-cnn", {"embed_dim": 32}, bb.module.state_dict(),
                          {"source": "untrained (tests)", "input_hw": [28, 28], "feature_dim": 32})
