"""Bad input matrix: every kind of bad shard is quarantined with a one-line reason naming the shard
and the cause, the good shards finish, nothing is lost; bad configuration ends the CLI with one line
and a non-zero exit code, never a traceback.

Real data (sklearn digits) on the real S3 server (SeaweedFS) under a real Prefect server.
`test_extract_flow.py::test_bad_shards_are_quarantined_and_the_rest_finish` already covers a
truncated Parquet file, a missing image column and non-image bytes on both stores; this file adds
the rest of the matrix (RELIABILITY.md lists it all).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from flows.extract_features import extract_features
from flows.generate_codes import encode
from flows.ingest import ingest
from infra import layout
from infra.manifests import list_quarantine, read_manifest
from infra.registry import register_coder
from infra.seaweed import free_port
from infra.settings import Settings
from infra.shards import features_table, read_table, table_bytes
from infra.store import open_store
from tests.conftest import settings_dict
from tests.helpers import register_untrained_cnn
from tests.integration.test_extract_flow import features_by_id

pytestmark = pytest.mark.s3

DIGITS = 1797


def png(h: int, w: int, value: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def raw_shard(ids, images, **extra) -> bytes:
    cols = {"id": ids if isinstance(ids, pa.Array) else pa.array(ids, pa.int64()),
            "image": images if isinstance(images, pa.Array) else pa.array(images, pa.binary())}
    cols.update(extra)
    return table_bytes(pa.table(cols))


def test_extract_bad_raw_matrix(prefect_server, s3_settings):
    """Empty, duplicate ids (within and across shards), oversized and null images, wrong column
    types, null ids: each shard quarantined with its reason; the three good shards finish."""
    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    ingest("digits", shard_rows=600, settings=cfg)  # parts 0..2, ids 0..1796
    register_untrained_cnn(store)
    ok = png(8, 8, 128)
    bad = {
        3: (raw_shard(pa.array([], pa.int64()), pa.array([], pa.binary())), "empty shard (0 rows)"),
        4: (raw_shard([5001, 5002, 5001], [ok] * 3), "1 duplicate ids within the shard"),
        5: (raw_shard([5101, 5102], [ok, png(4097, 4097)]), "id 5102: image 4097x4097 exceeds"),
        6: (raw_shard([5201, 5202], [ok, None]), "id 5202: image is null"),
        7: (raw_shard(pa.array(["a", "b"]), [ok, ok]), "column 'id' has type string, expected int64"),
        8: (raw_shard(pa.array([5401, None], pa.int64()), [ok, ok]), "1 null ids"),
        9: (raw_shard([5501, 5502], pa.array([1, 2], pa.int64())),
            "column 'image' has type int64, expected binary"),
        # the same item twice across shards: part 10 repeats id 700 of part 1 -> the later part loses
        10: (raw_shard([6001, 700, 6002], [ok] * 3), "id 700 also in part 1"),
    }
    for part, (data, _) in bad.items():
        store.write_bytes(layout.raw_key("digits", part), data)

    s = extract_features("digits", "test-cnn", settings=cfg)
    reasons = {q["part"]: q["reason"] for q in s["quarantined"]}
    assert s["failed"] == [] and s["done"] == 3 and sorted(reasons) == sorted(bad), s
    for part, (_, expected) in bad.items():
        assert expected in reasons[part], (part, reasons[part])
        assert "\n" not in reasons[part]
    records = {r["key"]: r for r in list_quarantine(store, "extract")}
    assert sorted(records) == [layout.raw_key("digits", p) for p in bad]
    assert "raw/digits/part-00001.parquet" in records[layout.raw_key("digits", 10)]["reason"]
    # nothing lost: every good item has exactly one feature row; bad shards have no output
    ids, feats = features_by_id(store, "digits", "test-cnn")
    np.testing.assert_array_equal(ids, np.arange(DIGITS))
    assert np.isfinite(feats).all()
    for part in bad:
        assert not store.exists(layout.features_key("digits", "test-cnn", part))
        assert read_manifest(store, layout.manifest_key("extract", "digits", "test-cnn", part)) is None

    # a rerun reports the same shards without reprocessing them
    s2 = extract_features("digits", "test-cnn", settings=cfg)
    assert (s2["done"], s2["skipped"], s2["failed"]) == (0, 3, [])
    assert {q["part"]: q["reason"] for q in s2["quarantined"]} == reasons


def test_nan_model_quarantines_until_the_model_is_fixed(prefect_server, s3_settings):
    """A model whose weights hold a NaN yields NaN features: the shards are quarantined naming the
    cause; re-registering the model (new checksum) lets the same shards through, no --force."""
    import torch

    from encoders.backbones import build_backbone
    from infra.registry import register_model

    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    ingest("digits", shard_rows=900, settings=cfg)  # 2 shards
    torch.manual_seed(0)
    sd = build_backbone("small-cnn", embed_dim=32).module.state_dict()
    broken = {k: v.clone() for k, v in sd.items()}
    broken["embed.weight"][0, 0] = float("nan")
    card = {"input_hw": [28, 28], "feature_dim": 32}
    register_model(store, "nan-cnn", "small-cnn", {"embed_dim": 32}, broken, card)
    s = extract_features("digits", "nan-cnn", settings=cfg)
    assert s["done"] == 0 and [q["reason"] for q in s["quarantined"]] == ["model produced NaN/Inf features"] * 2
    register_model(store, "nan-cnn", "small-cnn", {"embed_dim": 32}, sd, card)
    s2 = extract_features("digits", "nan-cnn", settings=cfg)
    assert (s2["done"], s2["quarantined"], s2["rows"]) == (2, [], DIGITS)


def test_encode_bad_features_matrix(prefect_server, s3_settings):
    """Features shards of the wrong dimension, with NaN/Inf, truncated, empty, with duplicate ids
    or the wrong schema are quarantined by the encode stage; the good shards are encoded."""
    from encoders.baselines import LshCoder

    cfg = settings_dict(s3_settings)
    store = open_store(s3_settings)
    rng = np.random.default_rng(0)
    good = {p: (np.arange(p * 100, p * 100 + 100), rng.standard_normal((100, 32), dtype=np.float32))
            for p in range(3)}
    for p, (ids, x) in good.items():
        store.write_bytes(layout.features_key("digits", "m32", p), table_bytes(features_table(ids, x)))
    coder = LshCoder(bits=16)
    coder.fit(np.concatenate([x for _, x in good.values()]), np.zeros(300, np.int64))
    register_coder(store, "lsh-16-m32", coder.state(), {"dataset": "digits", "model_id": "m32"})

    x_nan = rng.standard_normal((4, 32), dtype=np.float32)
    x_nan[2, 5] = np.nan
    x_inf = rng.standard_normal((4, 32), dtype=np.float32)
    x_inf[0, 0] = np.inf
    whole = table_bytes(features_table(np.arange(1000, 1100), rng.standard_normal((100, 32), dtype=np.float32)))
    bad = {
        3: (table_bytes(features_table(np.arange(900, 904), rng.standard_normal((4, 16), dtype=np.float32))),
            "features have D=16, but this coder was fitted on D=32"),
        4: (table_bytes(features_table(np.arange(910, 914), x_nan)), "1 rows with NaN/Inf features (first id 912)"),
        5: (table_bytes(features_table(np.arange(920, 924), x_inf)), "1 rows with NaN/Inf features (first id 920)"),
        6: (whole[: len(whole) // 3], "not a readable Parquet file"),
        7: (table_bytes(features_table(np.arange(0), np.zeros((0, 32), np.float32))), "empty shard (0 rows)"),
        8: (table_bytes(features_table(np.array([930, 931, 930]), rng.standard_normal((3, 32), dtype=np.float32))),
            "1 duplicate ids within the shard"),
        9: (table_bytes(pa.table({"id": pa.array([940], pa.int64()), "feature": [[0.5] * 32]})),
            "column 'feature' has type list<"),  # list<double>, expected fixed_size_list<float32>
    }
    for p, (data, _) in bad.items():
        store.write_bytes(layout.features_key("digits", "m32", p), data)

    [s] = encode("digits", "m32", ["lsh-16-m32"], settings=cfg)
    reasons = {q["part"]: q["reason"] for q in s["quarantined"]}
    assert s["failed"] == [] and s["done"] == 3 and sorted(reasons) == sorted(bad), s
    for p, (_, expected) in bad.items():
        assert expected in reasons[p], (p, reasons[p])
    for p, (ids, x) in good.items():
        t = read_table(store, layout.codes_key("digits", "lsh-16-m32", p))
        np.testing.assert_array_equal(t.column("id").to_numpy(), ids)
        assert t.schema.field("code").type == pa.binary(2)
    assert sorted(r["key"] for r in list_quarantine(store, "encode")) == \
        [layout.features_key("digits", "m32", p) for p in bad]


# -- CLI: bad configuration -----------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CODESHARD_")}
    return {**env, **settings.to_env(), "CODESHARD_S3_RETRIES": "2", "PYTHONUNBUFFERED": "1", **extra}


def one_line_error(p: subprocess.CompletedProcess, command: str) -> str:
    """The CLI failed with exactly one error line on stderr and no traceback; returns that line."""
    assert p.returncode not in (0, None), p
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith(f"codeshard {command}: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


def test_cli_unknown_dataset(prefect_server, s3_settings):
    p = run_cli("ingest", "nope", env=cli_env(s3_settings))
    line = one_line_error(p, "ingest")
    assert "unknown dataset 'nope'" in line and "digits" in line


def test_cli_missing_bucket_wrong_credentials_unreachable(prefect_server, s3_settings, seaweed):
    missing = Settings.load(**{**settings_dict(s3_settings), "store": "s3://no-such-bucket-42/x"})
    p = run_cli("doctor", env=cli_env(missing))
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr
    assert "store:    FAILED: bucket 'no-such-bucket-42' does not exist" in p.stdout
    line = one_line_error(run_cli("extract", "--dataset", "digits", "--model", "test-cnn",
                                  env=cli_env(missing)), "extract")
    assert "bucket 'no-such-bucket-42' does not exist" in line

    line = one_line_error(run_cli("extract", "--dataset", "digits", "--model", "test-cnn",
                                  env=cli_env(s3_settings, AWS_SECRET_ACCESS_KEY="not-the-secret")), "extract")
    assert "SignatureDoesNotMatch" in line and s3_settings.store.split("/", 3)[2] in line  # names the bucket

    dead = Settings.load(**{**settings_dict(s3_settings), "s3_endpoint": f"http://127.0.0.1:{free_port()}"})
    p = run_cli("doctor", env=cli_env(dead))
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr
    [store_line] = [ln for ln in p.stdout.splitlines() if ln.startswith("store:")]
    assert "Could not connect to the endpoint URL" in store_line
