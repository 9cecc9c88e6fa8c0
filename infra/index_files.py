"""Index files: faiss indexes and ids.parquet to and from bytes or local files (memory-mapped).
Pure serialisation; what goes where in the store is `infra.index_versions`."""
from __future__ import annotations

import io
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def index_to_bytes(index: Any) -> bytes:
    """faiss bytes of an Index or IndexBinary. Cost: one copy of the index (~10-40 ms per 3 MB)."""
    if isinstance(index, faiss.IndexBinary):
        return faiss.serialize_index_binary(index).tobytes()
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes, binary: bool) -> Any:
    arr = np.frombuffer(data, dtype=np.uint8)
    return faiss.deserialize_index_binary(arr) if binary else faiss.deserialize_index(arr)


def ids_bytes(ids: np.ndarray, parts: np.ndarray) -> bytes:
    """ids.parquet: position -> (id int64, part int32)."""
    t = pa.table({"id": pa.array(np.asarray(ids, dtype=np.int64)), "part": pa.array(np.asarray(parts, dtype=np.int32))})
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd")
    return buf.getvalue()


def ids_from_bytes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(io.BytesIO(data))
    return (t.column("id").to_numpy().astype(np.int64, copy=False),
            t.column("part").to_numpy().astype(np.int32, copy=False))


def index_from_file(path: str, binary: bool, mmap: bool = True) -> Any:
    """An index read from a local file; `mmap` maps it (IO_FLAG_MMAP) so its codes stay in the page
    cache, shared and evictable, instead of a private copy: a reload does not hold two copies in RAM.
    (faiss maps the inverted lists of IVF indexes and the codes of flat ones it can; others are read.)"""
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index_binary(path, flags) if binary else faiss.read_index(path, flags)
