"""infra/datasets.py: IDX parsing, WordNet parsing, split assignment, PNG round trip."""
import gzip
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra import datasets as D


def _write_idx(path, arr: np.ndarray, code: int = 0x08):
    header = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _fake_fashion(root, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), x)
        _write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), y)
        out[prefix] = (x, y)
    return out


def test_read_idx_uint8_and_int32(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(D.read_idx(str(tmp_path / "a.gz")), a)
    b = np.array([-5, 70000, 3], dtype=np.int32)
    _write_idx(tmp_path / "b", b, code=0x0C)
    got = D.read_idx(str(tmp_path / "b"))
    np.testing.assert_array_equal(got, b)
    assert got.dtype.isnative


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(str(tmp_path / "bad"))
    a = np.zeros((3, 2), np.uint8)
    _write_idx(tmp_path / "t", a)
    (tmp_path / "t").write_bytes((tmp_path / "t").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        D.read_idx(str(tmp_path / "t"))


def test_load_fashion_mnist_from_fake_root(tmp_path):
    parts = _fake_fashion(str(tmp_path))
    ds = D.load_fashion_mnist(str(tmp_path))
    assert len(ds) == 10 and ds.pixels.shape == (10, 28, 28) and ds.pixels.dtype == np.uint8
    np.testing.assert_array_equal(ds.ids, np.arange(10))
    np.testing.assert_array_equal(ds.is_test, [False] * 6 + [True] * 4)
    np.testing.assert_array_equal(ds.pixels[6:], parts["t10k"][0])
    assert ds.labels.dtype == np.int32 and len(ds.class_names) == 10


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(not os.path.exists(D.FASHION_MNIST_ROOT), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_shape():
    ds = D.load_fashion_mnist()
    assert ds.pixels.shape == (70000, 28, 28)
    assert np.bincount(ds.labels).tolist() == [7000] * 10
    assert ds.ids[60000] == 60000 and ds.is_test.sum() == 10000


FAKE_WORDNET = (
    "  1 This software and database is being provided to you, the LICENSEE, by  \n"
    "  2 Princeton University under the following license.  \n"
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  \n"
    "00002137 04 n 02 abstraction 0 abstract_entity 0 000 | a general concept formed; \"x\"  \n"
)


def test_parse_wordnet_data():
    ids, labels, glosses = D.parse_wordnet_data(FAKE_WORDNET.splitlines(True), pos_index=2)
    assert ids == [2 * 10**9 + 1740, 2 * 10**9 + 2137]
    assert labels == [3, 4]
    assert [D.WORDNET_LEXNAMES[i] for i in labels] == ["noun.Tops", "noun.act"]
    assert glosses == ["that which is perceived or known", 'a general concept formed; "x"']


def test_load_wordnet_fake_root(tmp_path):
    for pos in D.WORDNET_POS:
        (tmp_path / f"data.{pos}").write_text(FAKE_WORDNET)
    ds = D.load_wordnet(str(tmp_path))
    assert len(ds) == 8 and ds.pixels is None and len(ds.texts) == 8
    assert len(set(ds.ids.tolist())) == 8 and not ds.is_test.any()
    assert len(ds.class_names) == 45


def test_load_digits_scaled_to_uint8():
    ds = D.load_digits()
    assert ds.pixels.shape == (1797, 8, 8) and ds.pixels.dtype == np.uint8
    assert ds.pixels.max() == 255 and ds.pixels.min() == 0


def test_assign_splits_counts_with_test_part():
    labels = np.repeat(np.arange(3), 50)
    is_test = np.tile(np.r_[np.zeros(40, bool), np.ones(10, bool)], 3)
    s = D.assign_splits(labels, is_test, query_per_class=5, train_per_class=20, val_per_class=10)
    for c in range(3):
        sc = s[labels == c]
        assert (sc == "query").sum() == 5 and (sc == "train").sum() == 20 and (sc == "val").sum() == 10
    assert is_test[s == "query"].all()
    assert not is_test[(s == "train") | (s == "val")].any()


def test_assign_splits_small_class_is_shared_train_first_then_in_proportion():
    labels = np.r_[np.zeros(100, int), np.ones(7, int)]
    s = D.assign_splits(labels, np.zeros(107, bool), query_per_class=5, train_per_class=20, val_per_class=10)
    one = s[labels == 1]
    # 7 rows for (train 20, val 10, query 5): one each, then 4 in proportion 20:10:5 -> 3, 1, 0
    assert (one == "train").sum() == 4 and (one == "val").sum() == 2 and (one == "query").sum() == 1
    full = s[labels == 0]
    assert (full == "train").sum() == 20 and (full == "val").sum() == 10 and (full == "query").sum() == 5


@pytest.mark.parametrize("n, expected", [(1, ("train",)), (2, ("train", "val")), (3, ("train", "val", "query"))])
def test_assign_splits_tiny_class_without_test_part_gets_train_then_val_then_query(n, expected):
    labels = np.r_[np.zeros(50, int), np.full(n, 7)]
    s = D.assign_splits(labels, np.zeros(len(labels), bool), query_per_class=5, train_per_class=20, val_per_class=10)
    assert sorted(s[labels == 7]) == sorted(expected)


@pytest.mark.parametrize("n_rest, n_test", [(0, 1), (0, 3), (1, 3), (2, 3), (3, 0), (1, 0)])
def test_assign_splits_tiny_class_with_test_part_has_train_before_val_or_query(n_rest, n_test):
    labels = np.r_[np.zeros(60, int), np.full(n_rest + n_test, 7)]
    is_test = np.r_[np.arange(60) % 4 == 0, np.zeros(n_rest, bool), np.ones(n_test, bool)]
    s = D.assign_splits(labels, is_test, query_per_class=5, train_per_class=20, val_per_class=10)
    c = s[labels == 7]
    n_train, n_val, n_query = (c == "train").sum(), (c == "val").sum(), (c == "query").sum()
    if n_rest == 0:  # no non-test row to train on: its test rows are gallery, not queries
        assert n_train == n_val == n_query == 0 and (c == "database").all()
    else:
        assert (n_train, n_val) == D.small_class_counts(n_rest, (20, 10)) and n_train >= 1
        assert n_val == (n_rest >= 2) and n_query == n_test
    assert not is_test[labels == 7][(c == "train") | (c == "val")].any()


def test_assign_splits_refuses_val_or_query_without_train():
    with pytest.raises(ValueError, match="train_per_class must be >= 1"):
        D.assign_splits(np.zeros(10, int), np.zeros(10, bool), query_per_class=2, train_per_class=0, val_per_class=2)


@pytest.mark.parametrize("wanted", [(1000, 200, 100), (20, 10, 5), (10, 3, 4), (100, 30), (5, 0, 3)])
def test_small_class_counts_rule(wanted):
    prev = (0,) * len(wanted)
    for n in range(sum(wanted) + 5):
        got = D.small_class_counts(n, wanted)
        assert sum(got) == min(n, sum(wanted)) and all(0 <= g <= w for g, w in zip(got, wanted))
        assert all(g >= p for g, p in zip(got, prev))  # one more row never takes a row from a split
        wanted_idx = [i for i, w in enumerate(wanted) if w]
        assert all(got[i] >= 1 for i in wanted_idx[:n])  # one row each, in priority order, first
        prev = got
    assert D.small_class_counts(3, (1000, 200, 100)) == (1, 1, 1)
    assert D.small_class_counts(130, (1000, 200, 100)) == (100, 20, 10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.integers(0, 2**31 - 1),
       st.booleans(), st.integers(0, 6), st.integers(1, 30), st.integers(0, 10))
def test_assign_splits_properties(labels, seed, with_test, nq, ntr, nva):
    labels = np.asarray(labels)
    is_test = (np.arange(len(labels)) % 3 == 0) if with_test else np.zeros(len(labels), bool)
    s = D.assign_splits(labels, is_test, seed, nq, ntr, nva)
    s2 = D.assign_splits(labels, is_test, seed, nq, ntr, nva)
    np.testing.assert_array_equal(s, s2)  # deterministic
    assert set(s) <= set(D.SPLITS)  # one split per row: disjoint and covering by construction
    for c in np.unique(labels):
        sc = s[labels == c]
        n_q, n_tr, n_va = (sc == "query").sum(), (sc == "train").sum(), (sc == "val").sum()
        assert n_q <= nq and n_tr <= ntr and n_va <= nva
        if n_va or n_q:  # the rule this test file exists for: no val or query rows without train rows
            assert n_tr >= 1
        if is_test.any():
            rest, test = (labels == c) & ~is_test, (labels == c) & is_test
            assert (n_tr, n_va) == D.small_class_counts(rest.sum(), (ntr, nva))
            assert n_q == (min(nq, test.sum()) if n_tr else 0)
        else:
            assert (n_tr, n_va, n_q) == D.small_class_counts((labels == c).sum(), (ntr, nva, nq))
    if is_test.any():
        assert not is_test[(s == "train") | (s == "val")].any()


def test_assign_splits_seed_changes_draw_and_class_independence():
    labels = np.repeat(np.arange(2), 200)
    is_test = np.zeros(400, bool)
    a = D.assign_splits(labels, is_test, seed=0, query_per_class=10, train_per_class=50, val_per_class=10)
    b = D.assign_splits(labels, is_test, seed=1, query_per_class=10, train_per_class=50, val_per_class=10)
    assert (a != b).any()
    # dropping class 1 does not move class 0's draw
    c = D.assign_splits(labels[:200], is_test[:200], seed=0, query_per_class=10, train_per_class=50,
                        val_per_class=10)
    np.testing.assert_array_equal(a[:200], c)


def test_png_round_trip():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    blobs = D.png_bytes(x)
    assert len(blobs) == 20 and all(b[:8] == b"\x89PNG\r\n\x1a\n" for b in blobs)
    from infra.images import decode_images

    np.testing.assert_array_equal(decode_images(blobs, np.arange(20), (28, 28)), x)
    with pytest.raises(ValueError):
        D.png_bytes(x.astype(np.float32))


# -- vector datasets (GloVe) ------------------------------------------------------------------
def test_unlabelled_splits_counts_and_determinism():
    s = D.assign_unlabelled_splits(5000, seed=3, n_query=100, n_train=1000, n_val=50)
    assert s.shape == (5000,)
    counts = {k: int((s == k).sum()) for k in D.SPLITS}
    assert counts == {"query": 100, "train": 1000, "val": 50, "database": 3850}
    np.testing.assert_array_equal(s, D.assign_unlabelled_splits(5000, seed=3, n_query=100, n_train=1000, n_val=50))
    assert not np.array_equal(s, D.assign_unlabelled_splits(5000, seed=4, n_query=100, n_train=1000, n_val=50))


def test_unlabelled_splits_small_n_cuts_in_order():
    s = D.assign_unlabelled_splits(30, seed=0, n_query=20, n_train=20, n_val=5)
    assert (s == "query").sum() == 20 and (s == "val").sum() == 5
    assert (s == "train").sum() == 5 and (s == "database").sum() == 0
    assert D.assign_unlabelled_splits(0).shape == (0,)
    with pytest.raises(ValueError):
        D.assign_unlabelled_splits(10, n_query=-1)


def _fake_glove(root, n=50, d=4):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.arange(n * d, dtype=np.float32).reshape(n, d)
    np.save(os.path.join(root, D.GLOVE_EMB_FILE), x)
    pq.write_table(pa.table({"index": [f"w{i}" for i in range(n)]}), os.path.join(root, D.GLOVE_VOCAB_FILE))
    return x


def test_glove_source_slices_and_limit(tmp_path):
    x = _fake_glove(str(tmp_path))
    src = D.glove_source(root=str(tmp_path))
    assert (src.n, src.dim, src.model_id) == (50, 4, D.GLOVE_MODEL_ID)
    np.testing.assert_array_equal(D.read_vectors(src, 10, 13), x[10:13])
    assert D.read_words(src, 10, 13) == ["w10", "w11", "w12"]
    small = D.glove_source(root=str(tmp_path), limit=20)
    assert small.n == 20
    with pytest.raises(ValueError):
        D.read_vectors(small, 15, 25)
    with pytest.raises(ValueError):
        D.glove_source(root=str(tmp_path), limit=51)


def test_glove_source_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        D.glove_source(root=str(tmp_path))
