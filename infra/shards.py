"""Parquet shard schemas (raw / features / codes), validation, streaming readers and atomic writers.

Readers stream record batches (memory ~ one batch); writers buffer one output shard in memory and
publish it with a single atomic store write, so a killed run never leaves a partial shard.
"""
from __future__ import annotations

import io
import logging
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.store import Store, StoreError

LOG = logging.getLogger(__name__)

RAW_FIELDS = {
    "id": pa.int64(),
    "image": pa.binary(),  # PNG bytes
    "text": pa.string(),
    "label": pa.int32(),
    "split": pa.string(),  # query | train | val | database
}
SPLITS = ("query", "train", "val", "database")


class ShardInvalid(ValueError):
    """A shard failed validation. `reason` is one line naming the cause; the run goes on."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def features_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("feature", pa.list_(pa.float32(), dim))])


def codes_schema(nbytes: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("code", pa.binary(nbytes))])


# -- readers ----------------------------------------------------------------------------------
def _store_failure(store: Store, key: str, e: BaseException) -> StoreError | None:
    """A StoreError when pyarrow's exception is an I/O failure of the store (S3 errors read
    'AWS Error …'; local ones carry an errno), None when it is the bytes that are bad. A transient
    store fault must be retried, never quarantined as bad input (quarantine sticks until --force)."""
    if isinstance(e, StoreError):
        return e
    if isinstance(e, OSError) and ("AWS Error" in str(e) or e.errno is not None):
        from infra.store import clean_error

        return StoreError(f"read {store.uri_of(key)} failed: {clean_error(e)}")
    return None


def open_parquet(store: Store, key: str) -> pq.ParquetFile:
    """Open a shard for streaming; unreadable/truncated files raise ShardInvalid, store failures
    StoreError."""
    try:
        return pq.ParquetFile(store.open_input(key))
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        err = _store_failure(store, key, e)
        if err is not None:
            raise err from None
        raise ShardInvalid(key, f"not a readable Parquet file ({type(e).__name__}: {e})") from None


def iter_batches(store: Store, key: str, columns: Sequence[str] | None = None,
                 batch_rows: int = 4096, pf: pq.ParquetFile | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a shard as record batches of at most `batch_rows` rows. Pass `pf` when the caller
    already opened the file (its footer is then not read a second time)."""
    pf = pf or open_parquet(store, key)
    try:
        yield from pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None)
    except ShardInvalid:
        raise
    except Exception as e:
        err = _store_failure(store, key, e)
        if err is not None:
            raise err from None
        raise ShardInvalid(key, f"corrupt Parquet data ({type(e).__name__}: {e})") from None


def read_table(store: Store, key: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole shard (one shard fits in memory by construction)."""
    pf = open_parquet(store, key)
    try:
        return pf.read(columns=list(columns) if columns else None)
    except Exception as e:
        err = _store_failure(store, key, e)
        if err is not None:
            raise err from None
        raise ShardInvalid(key, f"corrupt Parquet data ({type(e).__name__}: {e})") from None


def features_matrix(table: pa.Table) -> np.ndarray:
    """(n, D) float32 view of a features table's `feature` column (one copy at most)."""
    col = table.column("feature").combine_chunks()
    dim = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def codes_matrix(table: pa.Table) -> np.ndarray:
    """(n, B) uint8 codes from a codes table's `code` column."""
    col = table.column("code").combine_chunks()
    nbytes = col.type.byte_width
    buf = col.buffers()[1]
    arr = np.frombuffer(buf, dtype=np.uint8, count=(col.offset + len(col)) * nbytes)
    return arr[col.offset * nbytes:].reshape(len(col), nbytes).copy()


# -- writers ----------------------------------------------------------------------------------
def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_table(store: Store, key: str, table: pa.Table) -> str:
    """Atomically publish `table` at `key`; returns its ETag (the output checksum)."""
    return store.write_bytes(key, table_bytes(table))


def features_table(ids: np.ndarray, feats: np.ndarray) -> pa.Table:
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    values = pa.array(feats.reshape(-1))
    col = pa.FixedSizeListArray.from_arrays(values, feats.shape[1])
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), col], schema=features_schema(feats.shape[1]))


def codes_table(ids: np.ndarray, codes: np.ndarray) -> pa.Table:
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, b = codes.shape
    col = pa.Array.from_buffers(pa.binary(b), n, [None, pa.py_buffer(codes.tobytes())])
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), col], schema=codes_schema(b))


# -- validation -------------------------------------------------------------------------------
def validate_raw(key: str, table: pa.Table) -> None:
    """Raw shard: `id` int64 unique, `image` (binary) or `text`, optional `label` int, `split`."""
    _check_nonempty(key, table)
    names = set(table.column_names)
    if "id" not in names:
        raise ShardInvalid(key, f"missing column 'id' (has {sorted(names)})")
    if "image" not in names and "text" not in names:
        raise ShardInvalid(key, f"needs an 'image' or 'text' column (has {sorted(names)})")
    check_raw_types(key, table.schema, [n for n in RAW_FIELDS if n in names])
    _check_ids(key, table)
    # a null label would read as class -2**63 (and join training and mAP), a null split as
    # 'database': refuse the shard instead of guessing
    for name, fix in (("label", "every row needs a class label"),
                      ("split", f"give every row one of {SPLITS}, or drop the column to have splits assigned")):
        if name in names and table.column(name).null_count:
            col = table.column(name)
            first = table.column("id").filter(col.is_null()).to_pylist()[0]
            raise ShardInvalid(key, f"{col.null_count} null {name}s (first id {first}): {fix}")
    if "split" in names:
        bad = set(pc.unique(table.column("split").drop_null()).to_pylist()) - set(SPLITS)
        if bad:
            raise ShardInvalid(key, f"unknown split values {sorted(bad)[:5]} (allowed {SPLITS})")


def normalise_raw(key: str, table: pa.Table) -> pa.Table:
    """The raw-schema columns of a validated table, each cast to its RAW_FIELDS type (other columns
    dropped). A value the type cannot hold (a uint64 id above 2**63-1, a label past int32) raises
    ShardInvalid naming the column: bad data, never retried. Cost: one copy of cast columns."""
    cols = {}
    for name in table.column_names:
        if name in RAW_FIELDS:
            try:
                cols[name] = table.column(name).cast(RAW_FIELDS[name])
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
                raise ShardInvalid(key, f"column {name!r} ({table.schema.field(name).type}) has a value "
                                        f"{RAW_FIELDS[name]} cannot hold ({type(e).__name__}: {e})") from None
    return pa.table(cols)


def check_raw_types(key: str, schema: pa.Schema, columns: Sequence[str]) -> None:
    """Each of `columns` (present in `schema`) has its raw-schema type (RAW_FIELDS). Needs only the
    Parquet footer, so a streaming stage can refuse a shard before reading any row."""
    for name in columns:
        actual = schema.field(name).type
        if not _compatible(actual, RAW_FIELDS[name]):
            raise ShardInvalid(key, f"column {name!r} has type {actual}, expected {RAW_FIELDS[name]}")


def validate_features(key: str, table: pa.Table, dim: int | None = None) -> None:
    """Features shard: `id` unique int64, `feature` fixed_size_list<float32>[dim], all finite."""
    _check_nonempty(key, table)
    if "id" not in table.column_names or "feature" not in table.column_names:
        raise ShardInvalid(key, f"features shard needs columns id, feature (has {table.column_names})")
    t = table.schema.field("feature").type
    if not pa.types.is_fixed_size_list(t) or t.value_type != pa.float32():
        raise ShardInvalid(key, f"column 'feature' has type {t}, expected fixed_size_list<float32>")
    if dim is not None and t.list_size != dim:
        raise ShardInvalid(key, f"feature dimension {t.list_size}, expected {dim}")
    _check_ids(key, table)
    x = features_matrix(table)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ShardInvalid(key, f"{int(bad.sum())} rows with NaN/Inf features (first id "
                                f"{int(table.column('id')[int(np.argmax(bad))].as_py())})")


def validate_codes(key: str, table: pa.Table, nbytes: int | None = None) -> None:
    _check_nonempty(key, table)
    t = table.schema.field("code").type if "code" in table.column_names else None
    if t is None or not pa.types.is_fixed_size_binary(t):
        raise ShardInvalid(key, f"codes shard needs column code: fixed_size_binary (has {table.schema})")
    if nbytes is not None and t.byte_width != nbytes:
        raise ShardInvalid(key, f"code width {t.byte_width} bytes, expected {nbytes}")
    _check_ids(key, table)


# -- ids across shards -------------------------------------------------------------------------
def overlapping_id_ranges(ranges: dict[int, tuple[int, int]]) -> set[int]:
    """Parts whose [id_min, id_max] overlaps another part's: the only shards that can share an id.
    Ingest gives each shard a contiguous id block, so this is usually empty and the exact check
    (`cross_shard_duplicates`) reads nothing. O(parts log parts)."""
    suspects: set[int] = set()
    group: list[int] = []
    reach = None
    for part, (lo, hi) in sorted(ranges.items(), key=lambda kv: (kv[1][0], kv[0])):
        if reach is not None and lo <= reach:
            group.append(part)
            reach = max(reach, hi)
            continue
        if len(group) > 1:
            suspects.update(group)
        group, reach = [part], hi
    if len(group) > 1:
        suspects.update(group)
    return suspects


def cross_shard_duplicates(ids_by_part: dict[int, np.ndarray]) -> dict[int, tuple[int, int, int]]:
    """Shards holding an id already held by an earlier (lower) part: {part: (earlier part, number
    of such ids, smallest such id)}. The earlier part wins, whatever order shards were processed
    in; a losing shard's ids are not counted against later parts. Memory: 16 B per id given."""
    seen = np.empty(0, np.int64)
    seen_part = np.empty(0, np.int64)
    out: dict[int, tuple[int, int, int]] = {}
    for part in sorted(ids_by_part):
        ids = np.unique(np.asarray(ids_by_part[part], dtype=np.int64))
        if len(seen) and len(ids):
            pos = np.minimum(np.searchsorted(seen, ids), len(seen) - 1)
            hit = seen[pos] == ids
            if hit.any():
                first = int(ids[hit][0])
                out[part] = (int(seen_part[np.searchsorted(seen, first)]), int(hit.sum()), first)
                continue
        merged = np.concatenate([seen, ids])
        order = np.argsort(merged, kind="stable")
        seen = merged[order]
        seen_part = np.concatenate([seen_part, np.full(len(ids), part, np.int64)])[order]
    return out


def _check_nonempty(key: str, table: pa.Table) -> None:
    if table.num_rows == 0:
        raise ShardInvalid(key, "empty shard (0 rows)")


def _check_ids(key: str, table: pa.Table) -> None:
    ids = table.column("id")
    if not pa.types.is_integer(ids.type):
        raise ShardInvalid(key, f"column 'id' has type {ids.type}, expected int64")
    if ids.null_count:
        raise ShardInvalid(key, f"{ids.null_count} null ids")
    n_unique = len(pc.unique(ids))
    if n_unique != table.num_rows:
        raise ShardInvalid(key, f"{table.num_rows - n_unique} duplicate ids within the shard")


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_binary(expected):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return False
