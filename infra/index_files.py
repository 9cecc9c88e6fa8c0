"""Index files: faiss indexes and ids.parquet to and from bytes or local files (memory-mapped), and
the on-disk merge of IVF partial files into one .ivfdata file. Local files only; what goes where in
the store is `infra.index_versions`."""
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


def index_from_file(path: str, binary: bool, mmap: bool = True, ondisk: bool = False) -> Any:
    """An index read from a local file; `mmap` maps it (IO_FLAG_MMAP) so its codes stay in the page
    cache, shared and evictable, instead of a private copy: a reload does not hold two copies in RAM.
    (faiss maps the inverted lists of IVF indexes and the codes of flat ones it can; others are read.)
    `ondisk`: an index merged on disk; its lists are read (mapped by faiss's OnDiskInvertedLists) from
    the IVFDATA file in the same directory as `path`, wherever it was written (IO_FLAG_ONDISK_SAME_DIR;
    IO_FLAG_MMAP is not given: faiss 1.15 crashes searching such an index read with it)."""
    if ondisk:
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return faiss.read_index_binary(path, flags) if binary else faiss.read_index(path, flags)


def merge_ivf_on_disk(trained: bytes, partial_paths: list[str], ivfdata_path: str) -> Any:
    """The trained empty IVF index (`trained` bytes) holding the lists of the partial index files, in
    order, written into `ivfdata_path` (faiss contrib.ondisk.merge_ondisk). Labels are positions: each
    partial file is first rewritten with its labels shifted by the rows before it (as `merge_from`
    does in memory; faiss 1.15's own shift_ids offsets unequal partials wrongly). Memory: one partial
    at a time (twice, while shifted); the merge maps the partials and writes the lists to a mapped
    file, so the lists are never all in private RAM. Float IVF types only."""
    from faiss.contrib.ondisk import merge_ondisk

    offset = 0
    for path in partial_paths:
        part = faiss.read_index(path)
        n = int(part.ntotal)
        if offset:
            shifted = index_from_bytes(trained, binary=False)
            shifted.merge_from(part, offset)  # moves the lists, labels + offset
            del part
            faiss.write_index(shifted, path)
            del shifted
        offset += n
    index = index_from_bytes(trained, binary=False)
    merge_ondisk(index, partial_paths, ivfdata_path, shift_ids=False)
    return index


def ivfdata_path_of(index: Any) -> str:
    """The local .ivfdata file an on-disk-merged index reads its lists from."""
    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename
