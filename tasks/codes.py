"""Coder tasks: train (fit + register) one coder; encode one features shard into a codes shard."""
from __future__ import annotations

import hashlib
import time
from typing import Any

import pyarrow as pa
from prefect import task
from prefect.tasks import exponential_backoff

from infra import layout
from infra.features import load_features
from infra.planner import ShardRef
from infra.registry import RegistryError, coder_card, load_coder, register_coder
from infra.settings import Settings
from infra.shards import ShardInvalid, codes_table, features_matrix, read_table, validate_features
from infra.store import Store, shared_store
from tasks.caching import ShardCache, ShardTarget
from tasks.stage import is_store_error, logger, run_shard_batch, run_shard_stage

ENCODE_VERSION = "encode-1"


def coder_id_for(method: str, bits: int, model_id: str) -> str:
    """Stable coder id: '<method>-<bits>-<model_id>' (DRQ: bits = its longest code; the float
    'coder' has one length, 32 x D, so its id is 'float-<model_id>')."""
    return f"float-{model_id}" if method == "float" else f"{method}-{bits}-{model_id}"


def features_fingerprint(store: Store, dataset: str, model_id: str) -> str:
    """Checksum over the features shards' ETags: a coder is retrained only when they change."""
    h = hashlib.sha256()
    for info in store.list(layout.features_prefix(dataset, model_id)):
        h.update(f"{info.key}:{info.etag};".encode())
    return h.hexdigest()[:16]


def features_etags(store: Store, dataset: str, model_id: str) -> dict[str, str]:
    """{features shard key: ETag} of (dataset, model_id). One LIST."""
    return {i.key: i.etag for i in store.list(layout.features_prefix(dataset, model_id))}


def coder_fits_features(store: Store, dataset: str, model_id: str, card: dict[str, Any]) -> bool:
    """A registered coder still fits the features when every shard it was trained on is unchanged
    and no shard added since holds a train or val row (new gallery items are encoded with it, not
    trained on). Cost: one LIST, then the `split` column of the raw shards added since training."""
    trained = card.get("features_etags")
    if trained is None:  # a card from before features_etags: any change to the shards retrains
        return card.get("features_fingerprint") == features_fingerprint(store, dataset, model_id)
    now = features_etags(store, dataset, model_id)
    if any(now.get(k) != e for k, e in trained.items()):
        return False
    for key in sorted(now.keys() - trained.keys()):
        split = read_table(store, layout.raw_key(dataset, layout.part_of(key)), columns=["split"]).column("split")
        if any(s in ("train", "val") for s in split.unique().to_pylist()):
            return False
    return True


def _family(method: str, params: dict[str, Any] | None) -> str:
    """The selection record a coder's settings come from ('gsl-qloss' for GSL in qloss mode)."""
    mode = (params or {}).get("mode")
    return f"gsl-{mode}" if method == "gsl" and mode in ("qloss", "none") else method


def val_metrics(coder, val, gallery) -> dict[str, float]:
    """mAP (R=all) of `val` queries against the train gallery at every length the coder makes.
    Used for the card and for selection; the query split is never touched."""
    from encoders.metrics import mean_average_precision

    codes = coder.encode(gallery.x)
    out = {}
    for bits in coder.lengths:
        r = mean_average_precision(lambda sl: coder.scores(val.x[sl], codes, bits), val.labels, gallery.labels)
        out[f"val_map@{bits}"] = round(float(r["map"]), 6)
    return out


@task(name="train_coder", task_run_name="train {method} {bits}b on {dataset} {model_id}", tags=["heavy"])
def train_coder(settings: Settings, dataset: str, model_id: str, method: str, bits: int,
                params: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Fit `method` at `bits` on the train split of (dataset, model_id) features, selecting on val;
    register coders/<coder_id>/. Skipped when the registered coder still fits the features
    (coder_fits_features: new shards without train/val rows do not retrain it). Returns its card."""
    from encoders.coders import make_coder

    store = shared_store(settings)
    coder_id = coder_id_for(method, bits, model_id)
    if not force:
        try:
            card = coder_card(store, coder_id)
            if coder_fits_features(store, dataset, model_id, card):
                logger().info("coder %s exists for these features: skipped", coder_id)
                return card
        except RegistryError:
            pass
    etags = features_etags(store, dataset, model_id)  # listed before reading: a shard added meanwhile counts as new
    fp = features_fingerprint(store, dataset, model_id)
    data = load_features(store, dataset, model_id, splits=("train", "val"))
    coder = make_coder(method, bits=bits, seed=settings.seed, **(params or {}))
    # the GPU only when asked for (--device cuda) and present (else one logged fallback): under the
    # default 'auto' coders keep training on the CPU, so a GPU host registers the same coders
    device = settings.torch_device() if settings.device == "cuda" else "cpu"
    if not coder.train_on(device):
        logger().warning("coder %s trains on the CPU: %s has no %s training path", coder_id, method, device)
    t0 = time.perf_counter()
    report = coder.fit(data["train"].x, data["train"].labels, (data["val"].x, data["val"].labels))
    fit_s = time.perf_counter() - t0
    metrics = val_metrics(coder, data["val"], data["train"])
    logger().info("coder %s: fit %.1fs, %s", coder_id, fit_s, metrics)
    from encoders.selection import SELECTION_METRIC, SELECTION_SPLIT, selection_record

    card = {"dataset": dataset, "model_id": model_id, "bits": bits, "lengths": list(coder.lengths),
            "selection": {**selection_record(_family(method, params)), "val_split": SELECTION_SPLIT,
                          "val_metric": SELECTION_METRIC},
            "symmetric": coder.symmetric, "bytes_per_item": coder.bytes_per_item(),
            "config": coder.config_dict(), "fit_s": fit_s, "fit_device": coder.train_device, "fit_report": dict(report.val_metrics),
            "val": metrics, "features_fingerprint": fp, "features_etags": etags, "train_rows": len(data["train"])}
    return register_coder(store, coder_id, coder.state(), card)


def encode_code_version(card: dict[str, Any]) -> str:
    """What a codes shard depends on besides its input: the coder's state and this code."""
    return f"{ENCODE_VERSION}:{card['coder_id']}:{card['checksum']}"


def _cache_target(inputs: dict[str, Any]) -> ShardTarget:
    """encode_shard's parameters -> what it reads and writes (for its cache key; one card GET)."""
    store, ref = shared_store(inputs["settings"]), inputs["ref"]
    dataset, coder_id = inputs["dataset"], inputs["coder_id"]
    return ShardTarget(store, store, "encode", dataset, coder_id, ref.part, ref.key,
                       layout.codes_key(dataset, coder_id, ref.part),
                       encode_code_version(coder_card(store, coder_id)))


@task(name="encode_shard", task_run_name="encode {dataset} part {ref.part:05d} with {coder_id}", retries=3, retry_delay_seconds=exponential_backoff(1),
      retry_condition_fn=is_store_error, tags=["heavy"], cache_policy=ShardCache(describe=_cache_target),
      result_serializer="json")
def encode_shard(settings: Settings, dataset: str, model_id: str, coder_id: str, ref: ShardRef,
                 force: bool = False) -> dict[str, Any]:
    """Encode one features shard with a registered coder into codes/<dataset>/<coder_id>/part-N
    (full-length codes, stored once). Cost: the coder's encode, ~1-20 µs per item on CPU."""
    store = shared_store(settings)
    coder, card = load_coder(store, coder_id)

    def work():
        table = read_table(store, ref.key)
        validate_features(ref.key, table)
        x = features_matrix(table)
        t0 = time.perf_counter()
        try:
            codes = coder.encode(x)
        except ValueError as e:  # validated, finite float32 rows: what is left is a shape the coder refuses
            raise ShardInvalid(ref.key, f"coder {coder_id} cannot encode it: {e}") from None
        dt = time.perf_counter() - t0
        out = codes_table(table.column("id").to_numpy(), codes)
        stats = {"encode_us_per_item": 1e6 * dt / max(1, len(x)), "bytes_per_item": int(codes.shape[1])}
        classes = coder.class_columns(x)
        if classes is not None:  # LLC: the decoded class and the OOD flag ride beside the code
            cls, flag = classes
            out = out.append_column("class", pa.array(cls)).append_column("ood", pa.array(flag))
            stats["ood_rows"] = int(flag.sum())
        return out, stats

    outcome = run_shard_stage(store, stage="encode", dataset=dataset, output_id=coder_id, ref=ref,
                              output_key=layout.codes_key(dataset, coder_id, ref.part),
                              code_version=encode_code_version(card),
                              force=force, work=work)
    return outcome.as_dict()


@task(name="encode_shards", task_run_name="encode {dataset} parts {refs[0].part:05d}+ with {coder_id}", tags=["heavy"])
def encode_shards(settings: Settings, dataset: str, model_id: str, coder_id: str, refs: list[ShardRef],
                  force: bool = False) -> list[dict[str, Any]]:
    """`encode_shard` over a batch of shards in one task run (more shards than
    `settings.max_shard_tasks`): the task overhead is paid once per batch."""
    return run_shard_batch(encode_shard.fn, "encode", refs, settings, dataset, model_id, coder_id,
                           force=force)
