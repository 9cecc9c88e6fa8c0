"""Whoever can write the store cannot make a reader run code or lose committed work
(RELIABILITY.md, "Untrusted store contents"): tampered Prefect cache records, tampered model cards."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from flows.extract_features import extract_features
from flows.ingest import ingest
from infra import layout
from infra.registry import load_backbone, write_card
from infra.shards import read_table
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn
from tests.integration.test_caching import task_states


class _Payload:
    """Unpickling this touches `marker`: proof that a pickle from the store was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def marking_decoder(obj):
    """A JSON object hook that leaves a marker: named by a tampered record, it must never be called."""
    Path(os.environ["CODESHARD_TEST_MARKER"]).touch()
    return obj


def pickle_record(key: str, marker: Path) -> bytes:
    """A Prefect result record that names the pickle serializer and carries `_Payload`."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    meta = ResultRecordMetadata(storage_key=key, serializer=PickleSerializer())
    return ResultRecord(metadata=meta, result=_Payload(str(marker))).serialize()


def test_a_pickled_cache_record_is_never_executed(prefect_server, any_settings, tmp_path, monkeypatch):
    cfg = settings_dict(any_settings)
    store = open_store(any_settings)
    ingest("digits", shard_rows=600, settings=cfg)  # parts 0..2
    register_untrained_cnn(store)
    first = extract_features("digits", "test-cnn", settings=cfg)
    assert first["done"] == 3
    expected = {p: read_table(store, layout.features_key("digits", "test-cnn", p)) for p in range(3)}
    records = [i.key for i in store.list("_prefect_results/") if i.key.rsplit("/", 1)[-1].startswith("shard-")]
    assert len(records) == 3

    marker = tmp_path / "pwned"
    monkeypatch.setenv("CODESHARD_TEST_MARKER", str(marker))
    # every record rewritten: 0 names pickle; 1 is JSON but names a decoder that runs code (its
    # data is true: replayed, with the fixed data-only decoder); 2 is JSON whose outcome lies (rows)
    store.write_bytes(records[0], pickle_record(records[0].rsplit("/", 1)[-1], marker))
    rec = json.loads(store.read_bytes(records[1]))
    rec["metadata"]["serializer"]["object_decoder"] = f"{__name__}.marking_decoder"
    store.write_bytes(records[1], json.dumps(rec).encode())
    rec = json.loads(store.read_bytes(records[2]))
    rec["result"] = json.dumps({**json.loads(rec["result"]), "rows": 10**6})
    store.write_bytes(records[2], json.dumps(rec).encode())

    st = extract_features("digits", "test-cnn", settings=cfg, return_state=True)
    assert not marker.exists(), "code named by a record in the store was executed"
    s = st.result()
    # the pickle and the lie were not replayed: those tasks ran, found their manifests and skipped
    assert task_states(st, "extract_shard") == {"Completed": 2, "Cached": 1}
    assert (s["skipped"], s["rows"]) == (3, 1797)
    for p, table in expected.items():
        assert read_table(store, layout.features_key("digits", "test-cnn", p)).equals(table)
    # the tasks' own JSON records replace the tampered ones: the next run hits the cache again
    st = extract_features("digits", "test-cnn", settings=cfg, return_state=True)
    assert task_states(st, "extract_shard") == {"Cached": 3} and not marker.exists()


def test_a_model_card_cannot_name_a_file_or_an_unknown_argument(local_settings, tmp_path, monkeypatch):
    """card.json's arch_kwargs reach the backbone constructor: a `weights_path` (a pickle outside the
    store, loaded even without weights_only when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1) is refused
    before anything is built, as are unknown arguments, wrong types and a malformed checksum."""
    import torch

    store = open_store(local_settings)
    marker = tmp_path / "pwned"
    torch.save({"_conv_stem.weight": _Payload(str(marker))}, tmp_path / "evil.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    card = register_untrained_cnn(store, "evil-cnn")
    prefix = layout.model_prefix("evil-cnn")
    tampered = [
        {**card, "arch": "efficientnet-lite0", "arch_kwargs": {"weights_path": str(tmp_path / "evil.pth")},
         "checksum": "package"},
        {**card, "arch_kwargs": {"embed_dim": 32, "activation": "os.system"}},
        {**card, "arch_kwargs": {"embed_dim": "32"}},
        {**card, "checksum": "../../etc/passwd"},
        {**card, "projection": {"in_dim": 32, "out_dim": -1}},
        {**card, "model_id": "another-model"},
    ]
    for bad in tampered:
        write_card(store, prefix, bad)
        with pytest.raises(Exception) as e:
            load_backbone(store, "evil-cnn")
        assert not marker.exists(), f"a card made the reader run code: {bad}"
        assert type(e.value).__name__ == "CardInvalid", e.value
    write_card(store, prefix, card)  # the genuine card still loads
    assert load_backbone(store, "evil-cnn")[0].feature_dim == 32
