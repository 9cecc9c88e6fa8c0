"""Feature extraction: one raw shard in, one features shard out."""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
from prefect import task
from prefect.tasks import exponential_backoff

from encoders.backbones import embed_pixels
from infra import layout
from infra.devices import set_torch_threads, shard_threads
from infra.images import BadImage, decode_images
from infra.planner import ShardRef
from infra.registry import image_input, load_backbone, model_card
from infra.settings import Settings
from infra.shards import ShardInvalid, check_raw_types, features_table, iter_batches, open_parquet
from infra.store import shared_store
from tasks.caching import ShardCache, ShardTarget
from tasks.stage import is_store_error, quarantine_duplicate_ids, run_shard_batch, run_shard_stage

T, R = TypeVar("T"), TypeVar("R")
EXTRACT_VERSION = "extract-2"  # 2: channels_last forward (extract-1 features up to float rounding), RGB decode


def code_version(card: dict[str, Any]) -> str:
    """What a features shard depends on besides its input: the model's weights and this code."""
    return f"{EXTRACT_VERSION}:{card['model_id']}:{card['checksum']}"


def _cache_target(inputs: dict[str, Any]) -> ShardTarget:
    """extract_shard's parameters -> what it reads and writes (for its cache key; one card GET)."""
    store, ref = shared_store(inputs["settings"]), inputs["ref"]
    dataset, model_id = inputs["dataset"], inputs["model_id"]
    return ShardTarget(store, store, "extract", dataset, model_id, ref.part, ref.key,
                       layout.features_key(dataset, model_id, ref.part), code_version(model_card(store, model_id)))


@task(name="extract_shard", task_run_name="extract {dataset} part {ref.part:05d}", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["heavy"], cache_policy=ShardCache(describe=_cache_target),
      result_serializer="json")
def extract_shard(settings: Settings, dataset: str, model_id: str, ref: ShardRef,
                  force: bool = False) -> dict[str, Any]:
    """Embed one raw shard with `model_id` into features/<dataset>/<model_id>/part-NNNNN.parquet.

    Streams the shard by record batches of `settings.batch_size` rows: one decode thread reads and
    decodes batch i+1 while batch i runs through the forward (channels_last), so memory ~ two batches
    of images + one shard of features. The backbone is loaded once per process (infra.registry's
    cache); torch threads are set once per thread (infra.devices.set_torch_threads). Bad rows
    quarantine the shard, with the first offending id in the reason.
    """
    store = shared_store(settings)
    device = settings.torch_device()
    backbone, card = load_backbone(store, model_id, device=device)
    if device == "cpu":
        set_torch_threads(shard_threads(settings.max_workers))
    text = card["arch"] == "minilm"
    hw, mode = image_input(card)

    def decoded(batch) -> tuple[np.ndarray, Any]:
        """(ids, texts or pixels) of one record batch; runs on the decode thread."""
        if batch.column(0).null_count:
            raise ShardInvalid(ref.key, f"{batch.column(0).null_count} null ids")
        ids = batch.column(0).to_numpy(zero_copy_only=False)
        if text:
            texts = batch.column(1).to_pylist()
            if any(t is None for t in texts):
                raise ShardInvalid(ref.key, "null text values")
            return ids, texts
        try:
            return ids, decode_images(batch.column(1).to_pylist(), ids, hw, mode)
        except BadImage as e:
            raise ShardInvalid(ref.key, str(e)) from None

    def work():
        ids_out, feats_out = [], []
        column = "text" if text else "image"
        pf = open_parquet(store, ref.key)
        schema = pf.schema_arrow
        if column not in schema.names:
            raise ShardInvalid(ref.key, f"model {model_id} needs a {column!r} column (has {sorted(schema.names)})")
        if "id" not in schema.names:
            raise ShardInvalid(ref.key, f"missing column 'id' (has {sorted(schema.names)})")
        check_raw_types(ref.key, schema, ["id", column])  # before any row is decoded
        batches = iter_batches(store, ref.key, columns=["id", column], batch_rows=settings.batch_size, pf=pf)
        for ids, inputs in prefetched(batches, decoded):
            if text:
                feats = backbone.features(inputs, batch_size=settings.batch_size)
            else:
                feats = embed_pixels(backbone.module, backbone.preprocess, inputs, batch_size=len(inputs))
            ids_out.append(ids)
            feats_out.append(feats)
        if not ids_out:
            raise ShardInvalid(ref.key, "empty shard (0 rows)")
        ids = np.concatenate(ids_out)
        if len(np.unique(ids)) != len(ids):
            raise ShardInvalid(ref.key, f"{len(ids) - len(np.unique(ids))} duplicate ids within the shard")
        feats = np.concatenate(feats_out)
        if not np.isfinite(feats).all():
            raise ShardInvalid(ref.key, "model produced NaN/Inf features")
        # the id range lets the flow check ids across shards without reading them (check_ids_across_shards)
        return features_table(ids, feats), {"dim": int(feats.shape[1]),
                                            "id_min": int(ids.min()), "id_max": int(ids.max())}

    outcome = run_shard_stage(store, stage="extract", dataset=dataset, output_id=model_id, ref=ref,
                              output_key=layout.features_key(dataset, model_id, ref.part),
                              code_version=code_version(card), force=force, work=work)
    return outcome.as_dict()


@task(name="extract_shards", task_run_name="extract {dataset} parts {refs[0].part:05d}+", tags=["heavy"])
def extract_shards(settings: Settings, dataset: str, model_id: str, refs: list[ShardRef],
                   force: bool = False) -> list[dict[str, Any]]:
    """`extract_shard` over a batch of shards in one task run (datasets with more shards than
    `settings.max_shard_tasks`): task overhead once per batch instead of per shard."""
    return run_shard_batch(extract_shard.fn, "extract", refs, settings, dataset, model_id, force=force)


@task(name="check_ids_across_shards", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["io"])
def check_ids_across_shards(settings: Settings, dataset: str, model_id: str,
                            outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """After every shard finished: a features shard sharing ids with an earlier part is quarantined
    (see tasks.stage.quarantine_duplicate_ids); returns the outcomes with those marked."""
    return quarantine_duplicate_ids(shared_store(settings), stage="extract", dataset=dataset, output_id=model_id,
                                    outcomes=outcomes,
                                    output_key=functools.partial(layout.features_key, dataset, model_id))


_END = object()


def prefetched(items: Iterable[T], fn: Callable[[T], R]) -> Iterator[R]:
    """`fn(item)` for each item, computed one item ahead on a single background thread (reading and
    decoding overlap the caller's forward, which releases the GIL). Exceptions from `items` or `fn`
    are raised at the item they belong to; closing early waits for the one item in flight."""
    it = iter(items)

    def step():
        try:
            return fn(next(it))
        except StopIteration:
            return _END

    with ThreadPoolExecutor(1, thread_name_prefix="decode") as ex:
        pending = ex.submit(step)
        while (value := pending.result()) is not _END:
            pending = ex.submit(step)
            yield value
