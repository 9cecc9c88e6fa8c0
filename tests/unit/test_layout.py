"""Store layout: names are checked once at the edge; artifact keys are derived safely."""
from __future__ import annotations

import re

import pytest

from infra import layout


@pytest.mark.parametrize("name", ["digits", "fashion-mnist", "my_data", "test-cnn64", "drq-64-digits-small-cnn",
                                  "digits-drq-16-digits-small-cnn-16b", "v1.2", "x" * 200])
def test_valid_names_pass(name):
    assert layout.check_name("dataset", name) == name


@pytest.mark.parametrize("name", ["digits/evil", "../..", "..", ".hidden", "", "MyData", "données", "a b",
                                  "-lead", "x" * 201, "a\\b"])
def test_invalid_names_are_refused_with_the_rule(name):
    with pytest.raises(ValueError, match=r"invalid dataset name .*lowercase ASCII letters"):
        layout.check_name("dataset", name)


@pytest.mark.parametrize("parts", [("ingest", "my_data"), ("ingest", "my-data"), ("extract", "v1.2", "test-cnn"),
                                   ("ingest", "digits")])
def test_artifact_keys_are_valid_for_prefect(parts):
    key = layout.artifact_key(*parts)
    assert re.fullmatch(r"[a-z0-9-]+", key), key


def test_artifact_keys_of_names_that_slug_alike_differ():
    assert layout.artifact_key("ingest", "digits") == "ingest-digits"
    assert layout.artifact_key("ingest", "my_data") != layout.artifact_key("ingest", "my-data")


def test_import_keys_hold_the_dataset_and_source():
    a, b = "file:///data/a", "s3://bucket/b"
    assert layout.import_shard_key("ds", a, "part-00000.parquet") != layout.import_shard_key("ds", b, "part-00000.parquet")
    assert layout.import_quarantine_name("ds1", a, "k") != layout.import_quarantine_name("ds2", a, "k")
    assert layout.import_splits_key("ds", a) != layout.import_splits_key("ds", b)


def test_index_files_staging_and_discovery_keys_are_built_here():
    assert layout.index_version_key("x", 7, layout.BUILD_FILE) == "indexes/x/v000007/build.json"
    assert layout.index_staging_prefix("x", "abc") == "indexes/x/_staging/abc/"
    assert layout.announced_key("d", "m") == "_manifests/discover/d/m/announced.json"


def test_keys_are_parsed_here():
    assert layout.dataset_of(layout.codes_key("d", "itq", 3)) == "d"
    assert layout.dataset_of(layout.raw_key("d2", 0)) == "d2"
    with pytest.raises(ValueError, match="not a raw, features or codes key"):
        layout.dataset_of("models/m/card.json")
    assert layout.folder_of(layout.index_staging_prefix("x", "t") + layout.TRAINED_FILE) == "indexes/x/_staging/t/"
    assert layout.segments_under(layout.INDEXES_ROOT, "indexes/x/v000001/ids.parquet") == ["x", "v000001", "ids.parquet"]
    with pytest.raises(ValueError, match="is not under"):
        layout.segments_under(layout.RAW_ROOT, "codes/d/c/part-00000.parquet")
