"""Model update on real data (digits): the gate refuses an independent model, ships a compatible one,
and the stored gallery features are never rewritten."""
from __future__ import annotations

import pytest

from flows.extract_features import extract_features
from flows.ingest import ingest
from flows.train_backbone import train_backbone
from flows.update_model import update_model
from infra.registry import model_card, read_pointer
from infra.store import open_store
from tasks.update import query_model_pointer
from tests.conftest import settings_dict

pytestmark = pytest.mark.s3


def gallery_state(store):
    return {i.key: i.etag for i in store.list("features/")}


def test_gate_refuses_independent_and_ships_dual_tuning(prefect_server, s3_settings):
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    ingest("digits", settings=cfg)
    train_backbone("digits", "small-cnn", "old", epochs=3, classes=[0, 1, 2, 3, 4], settings=cfg)
    extract_features("digits", "old", settings=cfg)
    before, writes = gallery_state(store), store.write_count("features/")

    ind = update_model("digits", "old", "wide-cnn", "independent", "new-ind", epochs=4, settings=cfg)
    assert not ind["gate_passed"]
    assert "M(new,old)=" in ind["gate_reason"] and "<= M(old,old)=" in ind["gate_reason"]
    assert read_pointer(store, query_model_pointer("digits"))[0] is None  # the pointer did not move
    assert model_card(store, "new-ind")["gate_passed"] is False  # registered, with its reason

    dt = update_model("digits", "old", "wide-cnn", "dual-tuning", "new-dt", epochs=10, settings=cfg)
    m = dt["compat"]["map"]
    assert dt["gate_passed"], dt["gate_reason"]
    assert m["M(new,old)"] > m["M(old,old)"] and m["M(new,new)"] > m["M(old,old)"]
    assert m["M(new,old)"] > ind["compat"]["map"]["M(new,old)"] + 0.2
    assert read_pointer(store, query_model_pointer("digits"))[0]["model_id"] == "new-dt"

    # nothing in the gallery was rewritten: same objects, same checksums, zero writes under features/
    assert gallery_state(store) == before
    assert store.write_count("features/") == writes
