"""Feature-extraction throughput: the real `extract_features` flow vs a bare torch forward loop.

Usage: .venv/bin/python bench/extract.py [--batch-sizes 256,1024] [--shards 0:2] [--shard-rows 3000]
                                        [--workers 2] [--reps 3] [--profile] [--device cpu|cuda]
                                        [--images png-grey|jpeg-rgb]

Setup (not timed): a local store (file:// in a temp dir), Fashion-MNIST ingested by the real
`ingest` flow into shards of `--shard-rows` rows, and a freshly initialised SmallCNN (embed_dim 128)
registered the way tests/helpers.py registers its untrained CNN.
`--images jpeg-rgb` (real-world-like input): the selected shards are rewritten once as a second dataset
whose images are RGB JPEGs (quality 90) of varying sizes, 48 to 192 px a side, each Fashion-MNIST
image resized and tinted with a seeded random colour; the SmallCNN then takes 3 channels
(in_ch=3) at 28x28, so the flow decodes, converts and resizes every JPEG.

Sides, timed alternately (bare, flow, skip, bare, flow, skip, ...), medians of `--reps` rounds:
- bare: `module(channels_last(preprocess(pixels[i:i+bs])))` (the fastest forward measured here)
  over the already-decoded pixels of the same shards, in memory, one side per torch thread count in
  `--bare-threads` (default 1 and all cores); the ratio is taken against the faster one. Decodes
  nothing, reads nothing.
- flow: `extract_features(..., shards=S, force=True)` with the thread task runner the CLI uses
  (`max_workers` from `--workers`): Parquet read, PNG decode, forward, Parquet write, manifests,
  Prefect task/flow bookkeeping. Counted with and without the fixed per-run overhead.
- skip: the same flow without force: every shard is skipped after reading its manifest, so its wall
  time is the flow's fixed per-run overhead (Prefect flow + task runs, listing, manifest reads).
Prefect's ephemeral-server start-up is measured once, separately (a no-op flow run first).

--profile: afterwards, the flow vs its task bodies run in plain threads (no Prefect) vs bare, then
cProfile of one `extract_shard` call (its `.fn`, no Prefect engine) split into
Parquet read / PNG decode / preprocess / forward / write / manifest, plus a
forward-only comparison on one shard's pixels: torch threads 1 vs all cores, NCHW vs channels_last
(as the task runs it).

Besides img/s (wall), CPU ms per image (this process + the Prefect server child) is reported: on a
shared machine it moves far less with other people's load than wall time does.

Target (issue #18): flow >= 0.9x the best bare side's images/s.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile

# Prefect settings must be in the environment before prefect is imported (STACK.md).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# A persistent home: a fresh one costs ~25 s of SQLite migrations per run (the Makefile sets its own).
os.environ.setdefault("PREFECT_HOME", os.path.join(tempfile.gettempdir(), "codeshard-bench-prefect"))
# The table is the output; per-shard INFO logs would bury it.
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"

import harness  # noqa: E402  (bench/harness, on sys.path as the script's folder)

DATASET = "fashion-mnist"
MODEL_ID = "bench-small-cnn"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--shards", default="0:2", help="part range extracted (half-open)")
    p.add_argument("--shard-rows", type=int, default=3000)
    p.add_argument("--workers", default="2", help="flow max_workers values to compare, e.g. 2,1")
    p.add_argument("--bare-threads", default="1,0",
                   help="torch thread counts of the bare loop, each its own side (0: all cores)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--images", choices=["png-grey", "jpeg-rgb"], default="png-grey",
                   help="png-grey: the ingested 28x28 PNGs; jpeg-rgb: RGB JPEGs of varying sizes")
    harness.add_device_arg(p)
    return p.parse_args()


def register_cnn(store, model_id: str, seed: int = 0, in_ch: int = 1) -> dict:
    """tests/helpers.register_untrained_cnn's pattern at embed_dim 128 (tests/ is not importable from bench/)."""
    import torch

    from encoders.backbones import build_backbone
    from infra.registry import register_model

    torch.manual_seed(seed)
    kw = {"embed_dim": 128, **({"in_ch": in_ch} if in_ch != 1 else {})}
    bb = build_backbone("small-cnn", **kw)
    return register_model(store, model_id, "small-cnn", kw, bb.module.state_dict(),
                          {"source": "untrained (bench)", "input_hw": [28, 28], "feature_dim": 128})


def jpeg_rgb_copy(store, refs, dataset: str, seed: int = 0) -> None:
    """Each selected raw shard rewritten under `dataset` with its images as RGB JPEGs (quality 90),
    48-192 px a side (random, seeded), each grey image resized and tinted with a random colour."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from infra import layout
    from infra.images import decode_images
    from infra.shards import read_table, table_bytes

    rng = np.random.default_rng(seed)
    for ref in refs:
        t = read_table(store, ref.key)
        grey = decode_images(t.column("image").to_pylist(), t.column("id").to_numpy(), (28, 28))
        blobs = []
        for g in grey:
            w, h = (int(v) for v in rng.integers(48, 193, size=2))
            tint = rng.uniform(0.3, 1.0, size=3)
            rgb = (g[..., None] * tint).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb, "RGB").resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
            blobs.append(buf.getvalue())
        t = t.set_column(t.column_names.index("image"), "image", pa.array(blobs, pa.binary()))
        store.write_bytes(layout.raw_key(dataset, ref.part), table_bytes(t))


def shard_pixels(store, refs, hw=(28, 28), mode: str = "L"):
    """Decoded pixels of the selected raw shards, in part order (the bare loop's input)."""
    import numpy as np

    from infra.images import decode_images
    from infra.shards import read_table

    out = []
    for ref in refs:
        t = read_table(store, ref.key, columns=["id", "image"])
        out.append(decode_images(t.column("image").to_pylist(), t.column("id").to_numpy(), hw, mode))
    return np.concatenate(out)


def main() -> int:
    args = parse_args()
    harness.require_device(args.device)
    import numpy as np
    import torch
    from prefect import flow

    from encoders.backbones import channels_last
    from flows.extract_features import extract_features
    from flows.ingest import ingest
    from infra import layout
    from infra.planner import parse_shard_range, select_shards
    from infra.registry import load_backbone
    from infra.runners import task_runner
    from infra.settings import Settings
    from infra.store import open_store

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    ncpu = os.cpu_count() or 1
    bare_threads = sorted({int(t) or ncpu for t in args.bare_threads.split(",")})
    tmp = tempfile.mkdtemp(prefix="codeshard-bench-extract-")
    atexit.register(shutil.rmtree, tmp, True)  # the store is scratch: ~50 MB of shards per run
    base = {"store": f"file://{tmp}/store", "shard_rows": args.shard_rows, "device": args.device}

    def cfg(bs: int, mw: int) -> dict:
        return {**base, "batch_size": bs, "max_workers": mw}

    def runner_for(c: dict):
        return task_runner(Settings.load(**c))

    harness.header("extract: flow vs bare torch forward")
    print(f"store: {base['store']}  PREFECT_HOME: {os.environ['PREFECT_HOME']}  load before: {harness.load_avg()}")

    @flow(name="bench-noop")
    def noop() -> int:
        return 0

    t_start = harness.timed(noop)  # ephemeral server start + first flow run
    t_noop = harness.median([harness.timed(noop) for _ in range(3)])
    c0 = cfg(batch_sizes[0], workers[0])
    t_ingest = harness.timed(lambda: ingest.with_options(task_runner=runner_for(c0))(
        DATASET, shard_rows=args.shard_rows, settings=c0))
    store = open_store(Settings.load(**c0))
    refs = select_shards(store.list(layout.raw_prefix(DATASET)), parse_shard_range(args.shards))
    dataset, mode = DATASET, "L"
    if args.images == "jpeg-rgb":
        dataset, mode = f"{DATASET}-jpeg", "RGB"
        jpeg_rgb_copy(store, refs, dataset)
        refs = select_shards(store.list(layout.raw_prefix(dataset)), parse_shard_range(args.shards))
    register_cnn(store, MODEL_ID, in_ch=3 if mode == "RGB" else 1)
    pixels = shard_pixels(store, refs, mode=mode)
    n = len(pixels)
    backbone, _ = load_backbone(store, MODEL_ID, device=args.device)

    def run_flow(c: dict, force: bool, want: str | None = None) -> dict:
        s = extract_features.with_options(task_runner=runner_for(c))(
            dataset, MODEL_ID, shards=args.shards, force=force, settings=c)
        want = want or ("done" if force else "skipped")
        if s[want] != len(refs) or s["failed"] or s["quarantined"]:
            raise RuntimeError(f"extract flow did not {want} all {len(refs)} shards: {s}")
        return s

    t_cold = harness.timed(lambda: run_flow(c0, force=False, want="done"))  # model load, first forward, etc.

    def bare(bs: int, threads: int):
        torch.set_num_threads(threads)  # the flow's task leaves torch at cpu_count // max_workers
        with torch.inference_mode():
            out = [backbone.module(channels_last(backbone.preprocess(pixels[i:i + bs]).to(args.device)))
                   .float().cpu().numpy() for i in range(0, n, bs)]
        return np.concatenate(out)

    rows, rss, cpu = [], {}, {}
    skip_all = []
    for bs in batch_sizes:
        sides = {f"bare t={k}": lambda bs=bs, k=k: bare(bs, k) for k in bare_threads}
        for mw in workers:
            sides[f"flow w={mw}"] = lambda bs=bs, mw=mw: run_flow(cfg(bs, mw), force=True)
        sides["skip"] = lambda bs=bs: run_flow(cfg(bs, workers[0]), force=False)

        def with_rss(name, fn):
            def run():
                c0 = harness.cpu_seconds()
                with harness.PeakRss() as r:
                    fn()
                cpu.setdefault((bs, name), []).append(harness.cpu_seconds() - c0)
                rss[(bs, name)] = max(rss.get((bs, name), 0), r.peak)
            return run

        def cpu_ms(name):
            return 1e3 * harness.median(cpu[(bs, name)]) / n

        for k in bare_threads:  # untimed warm-up at this batch size (oneDNN primitive cache), 2 batches
            torch.set_num_threads(k)
            with torch.inference_mode():
                backbone.module(channels_last(backbone.preprocess(pixels[: 2 * bs]).to(args.device)))
        load = harness.load_avg()
        t = harness.interleave({k: with_rss(k, f) for k, f in sides.items()}, args.reps, warmup=False)
        skip = harness.median(t["skip"])
        skip_all += t["skip"]
        bare_ips = max(n / harness.median(t[f"bare t={k}"]) for k in bare_threads)  # the best bare side
        for k in bare_threads:
            ips = n / harness.median(t[f"bare t={k}"])
            rows.append([bs, "bare forward", f"{k}", ips, "", f"{ips / bare_ips:.2f}", "",
                         cpu_ms(f"bare t={k}"), "",
                         harness.mib(rss[(bs, f'bare t={k}')]), harness.spread(t[f"bare t={k}"]), load])
        for mw in workers:
            wall = harness.median(t[f"flow w={mw}"])
            ips = n / wall
            ips_ex = n / max(wall - skip, 1e-9)
            rows.append([bs, f"flow max_workers={mw}", f"{max(1, ncpu // mw)} per task x {mw} tasks",
                         ips, ips_ex, f"{ips / bare_ips:.2f}", f"{ips_ex / bare_ips:.2f}",
                         cpu_ms(f"flow w={mw}"), cpu_ms(f"flow w={mw}") - cpu_ms("skip"),
                         harness.mib(rss[(bs, f'flow w={mw}')]), harness.spread(t[f"flow w={mw}"]), load])

    kind = "RGB JPEG 48-192 px -> 28x28x3" if mode == "RGB" else "28x28 grey PNG"
    print(f"images: {n} ({len(refs)} shards of {args.shard_rows} rows, parts {args.shards}), "
          f"{kind}, SmallCNN embed_dim 128 (untrained), device {args.device}")
    print(f"fixed costs: Prefect ephemeral start-up + first flow run {t_start:.1f} s; "
          f"no-op flow run {t_noop:.2f} s; ingest (70k images) {t_ingest:.1f} s; "
          f"first (cold) extract run {t_cold:.1f} s ({n / t_cold:.0f} img/s incl. model load)")
    print(f"per-run overhead of the extract flow (all shards skipped): median {harness.median(skip_all):.2f} s "
          f"(range {harness.spread(skip_all)} s)")
    harness.print_table(
        ["batch", "side", "torch threads", "img/s", "img/s excl. run overhead", "ratio vs best bare",
         "ratio excl. overhead", "CPU ms/img", "CPU ms/img excl. overhead", "peak RSS MiB",
         "wall s range", "load 1/5/15"], rows)
    print("CPU ms/img: user+system CPU of this process and its children (the Prefect server) per image;"
          " excl. overhead subtracts the skip run's CPU.")
    print(f"target: flow >= 0.9x the best bare side.  load after: {harness.load_avg()}")

    if args.profile:
        engine_vs_work(c0, dataset, refs, n, lambda: bare(batch_sizes[0], 1),
                       lambda: run_flow(c0, force=True), args)
        profile_one_shard(c0, dataset, refs[0], pixels[: args.shard_rows], backbone, batch_sizes[0], mode, args)
    return 0


def engine_vs_work(c: dict, dataset: str, refs, n: int, bare1, flow, args) -> None:
    """The same shards three ways, interleaved: the flow; the task bodies (`extract_shard.fn`) in a
    plain thread pool of max_workers (no Prefect engine, no flow); the bare 1-thread forward loop.
    Separates Prefect's cost from the task's own work (read, decode, forward, write, manifest)."""
    from concurrent.futures import ThreadPoolExecutor

    from infra.settings import Settings
    from tasks.extract import extract_shard

    settings = Settings.load(**c)

    def plain():
        with ThreadPoolExecutor(c["max_workers"]) as ex:
            out = list(ex.map(lambda r: extract_shard.fn(settings, dataset, MODEL_ID, r, force=True), refs))
        assert all(o["status"] == "done" for o in out), out

    load = harness.load_avg()
    t = harness.interleave({"flow (Prefect)": flow, "task bodies, plain threads": plain,
                            "bare forward, 1 thread": bare1}, args.reps, warmup=False)
    print()
    print(f"### where the flow's wall time goes: {n} images, batch {c['batch_size']}, "
          f"max_workers={c['max_workers']} (load {load})")
    best = n / harness.median(t["bare forward, 1 thread"])
    harness.print_table(["side", "img/s", "ratio vs bare", "wall s range"],
                        [[k, n / harness.median(v), f"{n / harness.median(v) / best:.2f}", harness.spread(v)]
                         for k, v in t.items()])


def profile_one_shard(c: dict, dataset: str, ref, pixels, backbone, bs: int, mode: str, args) -> None:
    """cProfile of one extract_shard call split by stage, then forward-only torch threads 1 vs all."""
    import cProfile
    import pstats

    import torch

    from infra.settings import Settings
    from tasks.extract import extract_shard

    settings = Settings.load(**c)
    prof = cProfile.Profile()
    load = harness.load_avg()
    prof.enable()
    extract_shard.fn(settings, dataset, MODEL_ID, ref, force=True)
    prof.disable()
    st = pstats.Stats(prof)
    total = st.total_tt  # type: ignore[attr-defined]

    def cum(file_part: str, func: str) -> float:
        t = 0.0
        for (fname, _line, name), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            if (name == func or name.startswith(f"<method '{func}'")) and file_part in fname:
                t += ct
        return t

    stages = [
        ("Parquet read (iter_batches)", cum("infra/shards.py", "iter_batches")),
        ("image decode (decode_images, decode thread)", cum("infra/images.py", "decode_images")),
        ("preprocess (grey_preprocess)", cum("encoders/backbones.py", "grey_preprocess")),
        ("forward incl. preprocess (embed_pixels)", cum("encoders/backbones.py", "embed_pixels")),
        ("Parquet write (write_table)", cum("infra/shards.py", "write_table")),
        ("manifest write", cum("infra/manifests.py", "write_manifest")),
        ("input head + md5 ETag", cum("infra/store.py", "head")),
    ]
    print()
    print(f"### cProfile of one extract_shard call ({len(pixels)} rows, batch {bs}, "
          f"max_workers={c['max_workers']} -> torch threads {torch.get_num_threads()}, load {load})")
    harness.print_table(["stage (cumulative, may nest)", "s", "% of call"],
                        [[name, s, f"{100 * s / total:.1f}"] for name, s in stages] + [["whole call", total, "100"]])
    # cProfile inflates Python-heavy code (PIL's per-image calls); time decode and to_pylist bare too.
    from infra.images import decode_images
    from infra.shards import read_table
    from infra.store import open_store

    t = read_table(open_store(settings), ref.key, columns=["id", "image"])
    col, ids = t.column("image"), t.column("id").to_numpy()
    t_list = harness.median([harness.timed(col.to_pylist) for _ in range(3)])
    blobs = col.to_pylist()
    t_dec = harness.median([harness.timed(lambda: decode_images(blobs, ids, (28, 28), mode)) for _ in range(3)])
    print(f"without the profiler: to_pylist {1e6 * t_list / len(blobs):.1f} us/image, "
          f"decode_images {1e6 * t_dec / len(blobs):.0f} us/image (one thread)")
    print("top 10 by own time:")
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:10]  # type: ignore[attr-defined]
    harness.print_table(["function", "calls", "own s", "cum s"],
                        [[f"{os.path.basename(f)}:{line} {name}", nc, tt, ct]
                         for (f, line, name), (_cc, nc, tt, ct, _) in rows])

    # torch threads and memory format: forward only, same pixels, interleaved.
    import copy

    nchw = copy.deepcopy(backbone.module).to(memory_format=torch.contiguous_format)  # loaded: channels_last

    def fwd(threads: int, channels_last: bool = False):
        module = backbone.module if channels_last else nchw

        def run():
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for i in range(0, len(pixels), bs):
                    x = backbone.preprocess(pixels[i:i + bs]).to(args.device)
                    module(x.contiguous(memory_format=torch.channels_last if channels_last else
                                        torch.contiguous_format))
        return run

    ncpu = os.cpu_count() or 1
    sides = {f"{k} thread(s), NCHW": fwd(k) for k in sorted({1, ncpu})}
    sides["1 thread(s), channels_last (as the task runs it)"] = fwd(1, channels_last=True)
    load = harness.load_avg()
    t = harness.interleave(sides, max(args.reps, 3))
    print()
    print(f"### forward only, one process, {len(pixels)} images, batch {bs} (load {load})")
    harness.print_table(["torch threads, memory format", "img/s", "wall s range"],
                        [[k, len(pixels) / harness.median(v), harness.spread(v)] for k, v in t.items()])


if __name__ == "__main__":
    sys.exit(main())
