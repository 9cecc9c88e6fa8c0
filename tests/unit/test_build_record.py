"""infra/index_versions.py BuildRecord: the one typed form of build.json (to_json / from_json), its
store key and JSON field names, the refresh-only keys, old records and unknown keys."""
from __future__ import annotations

import json

from infra import index_versions as iv
from infra import layout
from infra.store import open_store
from infra.settings import Settings


def _record(**kw) -> iv.BuildRecord:
    asked = dict(format=iv.FORMAT, name="d-itq-64b", mode="build", dataset="d", coder_id="itq", coder_checksum="c0",
                 method="itq", model_id="m", bits=64, memory_budget=2**30, exclude_split=None)
    return iv.BuildRecord(**{**asked, **kw})


def test_json_round_trip_keeps_every_field():
    b = _record(version=3, n=10, plan={"index_type": "binary-flat"}, inputs=[{"part": 0, "key": "k", "checksum": "e"}],
                seconds={"merge": 0.5}, batch_writers=["host:1"], eval={"recall_at_10": 1.0})
    assert iv.BuildRecord.from_json(json.loads(json.dumps(b.to_json()))) == b


def test_refresh_only_keys_are_left_out_of_a_build_and_kept_in_a_refresh():
    assert not {"attempt", "delta", "removal_reason"} & set(_record().to_json())
    r = _record(mode="refresh", based_on=2, attempt=1, delta={"added": ["k"]}, removal_reason="withdrawn")
    d = r.to_json()
    assert (d["attempt"], d["delta"], d["removal_reason"]) == (1, {"added": ["k"]}, "withdrawn")


def test_a_record_without_exclude_split_reads_as_queries_left_out():
    d = _record().to_json()
    del d["exclude_split"]  # builds from before the field was recorded left the query split out
    assert iv.BuildRecord.from_json(d).exclude_split == "query"
    assert iv.BuildRecord.from_json(_record().to_json()).exclude_split is None  # recorded null stays null


def test_unknown_keys_survive_a_read_and_write():
    d = {**_record().to_json(), "written_by_a_newer_version": {"x": 1}}
    b = iv.BuildRecord.from_json(d)
    assert b.extra == {"written_by_a_newer_version": {"x": 1}}
    assert b.to_json() == d


def test_write_and_read_use_the_version_key_and_the_attribute_names(tmp_path):
    store = open_store(Settings.load(store=f"file://{tmp_path}"))
    b = _record(version=7, n=5)
    iv.write_build(store, b.name, 7, b)
    key = layout.index_version_prefix(b.name, 7) + "build.json"
    raw = json.loads(store.read_bytes(key))
    assert raw["n"] == 5 and raw["coder_checksum"] == "c0" and "extra" not in raw
    assert iv.read_build(store, b.name, 7) == b
