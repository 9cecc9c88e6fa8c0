"""Code indexes: one import surface over the modules that do the work, split by what changes together:

    infra/index_plan.py      pure: the index-choice rule, factory strings, sizes, batch sizing,
                             refresh planning (tests/unit/test_index_plan.py, test_indexes.py)
    infra/code_index.py      faiss: coder -> index mapping, empty / trained indexes, adding stored
                             codes (IVF over stored codes with add_sa_codes), merge, remove
    infra/code_search.py     faiss: search, the coder's own scores, fixed-cost evaluation, nprobe tuning
    infra/index_files.py     index / ids bytes and local files (memory-mapped loads)
    infra/index_versions.py  the store: versions, staging keys, BuildRecord (build.json), CURRENT
    infra/devices.py         cpu / cuda choice with fallback, k-means and brute force on the GPU
    encoders/metrics.py      recall math (tie_aware_recall)

Measured timings of the engines are in BENCHMARKS.md ("Index engines").
"""
from __future__ import annotations

from encoders.metrics import tie_aware_recall  # noqa: F401
from infra.code_index import (CodeIndex, adc_engine_for, add_codes,  # noqa: F401
                              as_full_length, code_bits, code_index_from_bytes, code_index_from_file,
                              codec_of, configure_search, decode_codes, index_kind, merge_into, new_index,
                              prepare_queries, remove_parts, router, train_ivf)
from infra.code_search import (CODER_LUT_CHUNK_BYTES, GALLERY, LATENCY_QUERIES, QUERIES, evaluate,  # noqa: F401
                               query_vectors, reference_scores, search_prepared, stored_codes_at,
                               stored_vectors_at, tune_search)
from infra.index_files import (ids_bytes, ids_from_bytes, index_from_bytes, index_from_file,  # noqa: F401
                               index_to_bytes, ivfdata_path_of, merge_ivf_on_disk)
from infra.index_plan import (APPROX_OF, BINARY_FLAT, BINARY_IVF, BINARY_STORAGE, CODER_LUT,  # noqa: F401
                              EXACT_TYPES, EXTRA_BYTES, FLAT, FLAT_MAX_ITEMS, HNSW, HNSW_EF_SEARCH, HNSW_M,
                              ID_BYTES, IVF_FLAT, IVF_PQ, IVF_RQ, IVF_TRAIN_MAX_ROWS, IVF_TRAIN_NITER,
                              IVF_TRAIN_PER_LIST, IVF_TYPES, KINDS, ONDISK_TYPES, PQ_LUT, RECALL_TARGET,
                              REMOVABLE, RQ_LUT, TYPES_BY_KIND, IndexBudgetError, IndexBuildError, IndexPlan,
                              RefreshDelta, check_shrink, choose_index, choose_merge, factory_string, human_bytes,
                              index_memory_bytes, ivf_nlist, ivf_nprobe, ivf_routing, ivf_train_rows, nprobe_candidates,
                              parse_bytes, parse_index_type, plan_refresh, shards_per_task)
from infra.index_versions import (BUILD_FILE, CLAIM_FILE, FORMAT, IDS_FILE, INDEX_FILE, IVFDATA_FILE, STATS_FILE,  # noqa: F401
                                  TRAINED_FILE, BuildRecord, Current, cached_index_file, claim_version,
                                  commit_current, digest_of, discard_version, load_version, new_build_id,
                                  peak_rss_bytes, read_build, read_current, staging_key_prefix, version_key, write_build,
                                  write_version_files)

EXACT_RECALL_GATE = 0.99  # an exact index that disagrees with its coder more than this is not published
