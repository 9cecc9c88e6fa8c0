"""Imports of external Parquet shards (flows/ingest.py with a source, infra/imports.py): imports
append and never collide, bad values are quarantined with a reason (never retried as store faults),
quarantine records name dataset and source, names are checked before any work.

Real data (sklearn digits images) on a local store under a real Prefect server.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from flows.ingest import ingest
from infra import layout
from infra.manifests import list_quarantine
from infra.shards import read_table, table_bytes
from infra.store import open_store
from tasks.ingest import load_with_splits, raw_table
from tests.conftest import settings_dict


def shard(ids, **columns) -> pa.Table:
    """A raw-schema shard of digits images with the given ids (and label/split/id overrides)."""
    ds, split = load_with_splits("digits", 0)
    rows = np.arange(len(ids)) % len(ds)
    t = raw_table(ds, split, 0, len(ds)).take(pa.array(rows))
    t = t.set_column(0, "id", pa.array(ids, pa.int64()))
    for name, values in columns.items():
        i = t.column_names.index(name)
        t = t.set_column(i, name, values)
    return t


def put(store, key: str, table: pa.Table) -> None:
    store.write_bytes(key, table_bytes(table))


def raw_ids(store, dataset: str) -> dict[int, list[int]]:
    """{part: sorted ids} of the dataset's raw shards."""
    out = {}
    for info in store.list(layout.raw_prefix(dataset)):
        out[layout.part_of(info.key)] = sorted(read_table(store, info.key, columns=["id"]).column("id").to_pylist())
    return out


def _stores(settings, a_uri: str, b_uri: str):
    return (open_store(settings), open_store(settings, uri=a_uri), open_store(settings, uri=b_uri),
            a_uri, b_uri, settings_dict(settings))


@pytest.fixture
def stores(local_settings, tmp_path):
    """(destination store, source store A, source store B, their URIs, flow settings)."""
    return _stores(local_settings, f"file://{tmp_path / 'src-a'}", f"file://{tmp_path / 'src-b'}")


@pytest.fixture(params=["local", "s3"])
def both_stores(request, tmp_path):
    """`stores` on a local folder and on SeaweedFS (sources beside the store, in the same bucket)."""
    settings = request.getfixturevalue(f"{request.param}_settings")
    if request.param == "local":
        return _stores(settings, f"file://{tmp_path / 'src-a'}", f"file://{tmp_path / 'src-b'}")
    return _stores(settings, f"{settings.store}-src-a", f"{settings.store}-src-b")


def test_second_import_appends_and_reimport_keeps_parts(prefect_server, both_stores):
    """#15 item 2: `ingest dup --from A` (3 shards, ids 0..299) then `--from B` (2 shards, ids
    1000..1199) keeps every id (the old code left 1000..1199 and 200..299). Re-importing A skips
    its unchanged shards, redoes a changed one into the same part, appends a new one."""
    store, a, b, a_uri, b_uri, cfg = both_stores
    for i in range(3):
        put(a, f"part-{i:05d}.parquet", shard(range(100 * i, 100 * i + 100)))
    for i in range(2):
        put(b, f"part-{i:05d}.parquet", shard(range(1000 + 100 * i, 1100 + 100 * i)))
    s1 = ingest("dup", source=a_uri, settings=cfg)
    s2 = ingest("dup", source=b_uri, settings=cfg)
    assert (s1["done"], s2["done"], s1["failed"], s2["failed"]) == (3, 2, [], [])
    got = raw_ids(store, "dup")
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert sorted(i for ids in got.values() for i in ids) == list(range(300)) + list(range(1000, 1200))

    put(a, "part-00001.parquet", shard(range(100, 150)))  # changed
    put(a, "part-00003.parquet", shard(range(300, 350)))  # new
    s3 = ingest("dup", source=a_uri, settings=cfg)
    assert (s3["done"], s3["skipped"], s3["failed"], s3["quarantined"]) == (2, 2, [], [])
    got = raw_ids(store, "dup")
    assert got[1] == list(range(100, 150)) and got[5] == list(range(300, 350))
    assert got[3] == list(range(1000, 1100)) and got[4] == list(range(1100, 1200))

    # without --from, a dataset that is not packaged re-imports from every recorded source
    s4 = ingest("dup", settings=cfg)
    assert (s4["shards"], s4["skipped"], s4["done"]) == (6, 6, 0)


def test_two_imports_at_once_do_not_collide(prefect_server, both_stores):
    """#15 item 2: two imports of different sources into one dataset at the same time both land
    whole (the old code numbered both from part 0: one source's rows were lost)."""
    store, a, b, a_uri, b_uri, cfg = both_stores
    for i in range(3):
        put(a, f"part-{i:05d}.parquet", shard(range(100 * i, 100 * i + 100)))
        put(b, f"part-{i:05d}.parquet", shard(range(5000 + 100 * i, 5100 + 100 * i)))
    results, errors = {}, []

    def run(uri):
        try:
            results[uri] = ingest("both", source=uri, settings=cfg)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(u,)) for u in (a_uri, b_uri)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and all(r["done"] == 3 and not r["failed"] for r in results.values())
    got = raw_ids(store, "both")
    assert len(got) == 6
    assert sorted(i for ids in got.values() for i in ids) == list(range(300)) + list(range(5000, 5300))


def test_bad_values_are_quarantined_with_a_reason_not_retried(prefect_server, stores):
    """#15 items 6 and 7: an id above int64, a label past int32, a null label and a null split are
    bad data: each shard is quarantined with its reason at once (the old code retried the
    ArrowInvalid 3 times as a store fault and reported 'failed part -1', and let null labels and
    splits through as class -2**63 and 'database'); the good shard lands; a rerun reports them
    again without reading them."""
    store, a, _, a_uri, _, cfg = stores
    put(a, "part-00000.parquet", shard(range(0, 10)))
    put(a, "part-00001.parquet", shard(range(10, 20), id=pa.array([2**63 + 5] + list(range(11, 20)), pa.uint64())))
    put(a, "part-00002.parquet", shard(range(20, 30), label=pa.array([2**40] + [1] * 9, pa.int64())))
    put(a, "part-00003.parquet", shard(range(30, 40), label=pa.array([None] + [1] * 9, pa.int32())))
    put(a, "part-00004.parquet", shard(range(40, 50), split=pa.array([None] + ["train"] * 9, pa.string())))
    t0 = time.perf_counter()
    s = ingest("vals", source=a_uri, settings=cfg)
    seconds = time.perf_counter() - t0
    assert (s["done"], s["failed"]) == (1, [])
    reasons = {q["part"]: q["reason"] for q in s["quarantined"]}
    assert sorted(reasons) == [1, 2, 3, 4]
    assert "column 'id' (uint64) has a value int64 cannot hold" in reasons[1]
    assert "column 'label' (int64) has a value int32 cannot hold" in reasons[2]
    assert reasons[3].startswith("1 null labels (first id 30)")
    assert reasons[4].startswith("1 null splits (first id 40)")
    assert seconds < 6  # not retried: 3 task retries back off 1 + 2 + 4 s
    assert raw_ids(store, "vals") == {0: list(range(10))}
    again = ingest("vals", source=a_uri, settings=cfg)
    assert (again["skipped"], len(again["quarantined"]), again["done"]) == (1, 4, 0)


def test_quarantine_records_name_dataset_and_source(prefect_server, stores):
    """#15 item 10: the same relative key, bad in two sources imported into two datasets, keeps two
    records (the old key `_quarantine/import/<key>` was shared: the second overwrote the first)."""
    store, a, b, a_uri, b_uri, cfg = stores
    put(a, "part-00000.parquet", shard(range(10), label=pa.array([None] * 10, pa.int32())))
    put(b, "part-00000.parquet", shard(range(10), split=pa.array([None] * 10, pa.string())))
    assert len(ingest("qa", source=a_uri, settings=cfg)["quarantined"]) == 1
    assert len(ingest("qb", source=b_uri, settings=cfg)["quarantined"]) == 1
    records = {r["key"]: r["reason"] for r in list_quarantine(store, "import")}
    assert len(records) == 2
    assert "null labels" in records[layout.import_quarantine_name("qa", a_uri, "part-00000.parquet")]
    assert "null splits" in records[layout.import_quarantine_name("qb", b_uri, "part-00000.parquet")]


@pytest.mark.parametrize("name", ["digits/evil", "../..", "my data", "Ünïcode"])
def test_bad_dataset_names_are_refused_before_any_work(prefect_server, stores, name):
    """#15 item 5: a name that is not one path segment of the allowed characters is refused at the
    flow's entry; nothing is written (the old code made `digits/evil` parts of `digits`)."""
    store, a, _, a_uri, _, cfg = stores
    put(a, "part-00000.parquet", shard(range(10)))
    with pytest.raises(ValueError, match="invalid dataset name"):
        ingest(name, source=a_uri, settings=cfg)
    assert store.list("") == []


def test_a_name_with_an_underscore_goes_through_extract(prefect_server, stores):
    """#15 item 5: `my_data` is a valid name; its artifact keys are derived safely (the old code
    failed extract after all the work, on Prefect's artifact-key check)."""
    from flows.extract_features import extract_features
    from tests.helpers import register_untrained_cnn

    store, a, _, a_uri, _, cfg = stores
    put(a, "part-00000.parquet", shard(range(50)))
    register_untrained_cnn(store)
    assert ingest("my_data", source=a_uri, settings=cfg)["done"] == 1
    s = extract_features("my_data", "test-cnn", settings=cfg)
    assert (s["done"], s["failed"], s["rows"]) == (1, [], 50)


def test_a_dataset_never_imported_is_a_clear_error(prefect_server, stores):
    *_, cfg = stores
    with pytest.raises(ValueError, match="unknown dataset 'nothing-here'.*nothing was imported"):
        ingest("nothing-here", settings=cfg)


def test_imported_dataset_runs_the_pipeline_and_a_new_source_shard_goes_through_alone(prefect_server, stores):
    """#14 item 2: a dataset imported from Parquet shards goes through `pipeline` (the old code
    failed in its ingest step: "unknown dataset 'mydata'"); a shard added to the source later is
    picked up by the next pipeline run, which does only that shard in ingest, extract and encode,
    and publishes an index holding every item."""
    from flows.pipeline import pipeline
    from infra import indexes as ix
    from tests.helpers import register_untrained_cnn

    store, a, _, a_uri, _, cfg = stores
    ds, split = load_with_splits("digits", 0)
    split = split.copy()
    split[1500:] = "database"  # the shard added later brings new gallery items: the coder is not retrained
    for i, (lo, hi) in enumerate([(0, 500), (500, 1000), (1000, 1500)]):
        put(a, f"part-{i:05d}.parquet", raw_table(ds, split, lo, hi))
    register_untrained_cnn(store)
    assert ingest("mydata", source=a_uri, settings=cfg)["done"] == 3
    args = dict(model_id="test-cnn", coders={"itq": 16}, bits=[16], evaluate_methods=["itq"], settings=cfg)

    def covers(out, n):
        """The index holds exactly every item of the first `n` rows, query rows included (nothing
        is left out unless asked), and says so: ntotal == the dataset's row count."""
        (idx,) = out["indexes"]
        held = read_table(store, ix.version_key(idx["name"], idx["version"], ix.IDS_FILE)).column("id").to_pylist()
        return sorted(held) == [int(i) for i in ds.ids[:n]] and idx["n"] == n and idx["excluded"] is None

    first = pipeline("mydata", **args)
    assert (first["ingest"]["skipped"], first["extract"]["done"], first["encode"][0]["done"]) == (3, 3, 3)
    assert covers(first, 1500)

    put(a, "part-00003.parquet", raw_table(ds, split, 1500, len(ds)))
    second = pipeline("mydata", **args)
    assert second["coders"] == first["coders"]  # registered once, not retrained
    for stage in (second["ingest"], second["extract"], second["encode"][0]):
        assert (stage["done"], stage["skipped"], stage["failed"], stage["quarantined"]) == (1, 3, [], []), stage
    assert second["extract"]["rows_written"] == len(ds) - 1500
    assert second["indexes"][0]["version"] > first["indexes"][0]["version"]
    assert covers(second, len(ds)) and not covers(first, len(ds))
    # the library API finds an item of the new shard through the published index
    import codeshard

    index = codeshard.open_index(second["indexes"][0]["name"], store=cfg["store"], s3_endpoint=cfg.get("s3_endpoint"))
    new_id = int(ds.ids[len(ds) - 1])
    assert index.version == second["indexes"][0]["version"]
    assert index.search_by_id(new_id, k=5).ids[0][0] == new_id


def test_raw_shards_with_no_recorded_source_are_reported_as_there(prefect_server, stores):
    """A dataset whose raw shards were put in the store some other way: `ingest <dataset>` (as the
    pipeline calls it) reports them skipped instead of 'unknown dataset'."""
    store, *_, cfg = stores
    put(store, layout.raw_key("handmade", 0), shard(range(40)))
    put(store, layout.raw_key("handmade", 1), shard(range(40, 70)))
    s = ingest("handmade", settings=cfg)
    assert (s["shards"], s["skipped"], s["done"], s["rows"]) == (2, 2, 0, 70)
