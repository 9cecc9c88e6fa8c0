"""tasks/extract.py on a local store, without Prefect: the decode-ahead helper, features equal to the
plain NCHW forward, JPEG/RGB shards of varying sizes, a bad JPEG's quarantine, the cuda fallback."""
from __future__ import annotations

import copy
import io
import logging
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from encoders.backbones import build_backbone, grey_preprocess
from infra import devices, layout
from infra.images import decode_images
from infra.planner import select_shards
from infra.registry import load_backbone, register_model
from infra.settings import Settings
from infra.shards import features_matrix, read_table, table_bytes
from infra.store import open_store
from tasks.extract import extract_shard, prefetched

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prefetched_keeps_order_and_computes_the_next_item_on_another_thread():
    """While the caller holds item 0, fn(item 1) has already started on the decode thread."""
    started = {i: threading.Event() for i in range(4)}
    threads = []

    def fn(i):
        threads.append(threading.current_thread().name)
        started[i].set()
        return i * 10

    out = []
    for v in prefetched(range(4), fn):
        if v < 30:
            assert started[v // 10 + 1].wait(timeout=30), f"item {v // 10 + 1} not started while {v} is used"
        out.append(v)
    assert out == [0, 10, 20, 30]
    assert all(t.startswith("decode") for t in threads) and threading.current_thread().name not in threads


def test_prefetched_raises_at_the_item_that_failed():
    def fn(i):
        if i == 2:
            raise ValueError("bad item 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad item 2"):
        for v in prefetched(range(5), fn):
            got.append(v)
    assert got == [0, 1]


def jpeg(arr: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_raw(store, dataset: str, part: int, blobs: list[bytes], first_id: int = 0) -> None:
    ids = pa.array(np.arange(first_id, first_id + len(blobs)), pa.int64())
    store.write_bytes(layout.raw_key(dataset, part), table_bytes(pa.table({"id": ids, "image": pa.array(blobs, pa.binary())})))


def register_cnn(store, model_id: str, in_ch: int) -> None:
    torch.manual_seed(0)
    kw = {"embed_dim": 16, **({"in_ch": in_ch} if in_ch != 1 else {})}
    bb = build_backbone("small-cnn", **kw)
    register_model(store, model_id, "small-cnn", kw, bb.module.state_dict(),
                   {"source": "untrained (tests)", "input_hw": [28, 28], "feature_dim": 16})


def extract_all(settings, dataset: str, model_id: str) -> list[dict]:
    store = open_store(settings)
    refs = select_shards(store.list(layout.raw_prefix(dataset)))
    return [extract_shard.fn(settings, dataset, model_id, ref, force=True) for ref in refs]


def plain_forward(store, model_id: str, x: torch.Tensor) -> np.ndarray:
    """The forward as extract-1 ran it: NCHW weights and input (the loaded module is channels_last)."""
    bb, _ = load_backbone(store, model_id)
    nchw = copy.deepcopy(bb.module).to(memory_format=torch.contiguous_format)
    assert not nchw.features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return nchw(x.contiguous()).numpy()


def test_grey_png_features_equal_the_plain_nchw_forward(local_settings):
    """The channels_last, decode-ahead task writes, per row, the features of the plain NCHW forward
    of the decoded image (float rounding only), in row order, over several record batches."""
    settings = Settings.load(store=local_settings.store, batch_size=7)
    store = open_store(settings)
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    write_raw(store, "grey", 0, [png(p) for p in px])
    register_cnn(store, "cnn1", 1)
    [o] = extract_all(settings, "grey", "cnn1")
    assert (o["status"], o["rows"]) == ("done", 30)
    loaded, _ = load_backbone(store, "cnn1")
    assert loaded.module.features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    ft = read_table(store, layout.features_key("grey", "cnn1", 0))
    np.testing.assert_array_equal(ft.column("id").to_numpy(), np.arange(30))
    np.testing.assert_allclose(features_matrix(ft), plain_forward(store, "cnn1", grey_preprocess(px)),
                               rtol=1e-5, atol=1e-5)


def test_rgb_jpegs_of_varying_sizes_are_decoded_resized_and_embedded(local_settings):
    """A shard of RGB JPEGs 40x30 to 200x150 through a 3-channel CNN: each row's features are the
    forward of its JPEG decoded as RGB at 28x28; a second shard with one truncated JPEG is
    quarantined naming that row's id, and the first shard's output stands."""
    settings = Settings.load(store=local_settings.store, batch_size=8)
    store = open_store(settings)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    sizes = [(40 + 8 * i, 30 + 6 * i) for i in range(20)]
    blobs = [jpeg(b, s) for b, s in zip(base, sizes)]
    write_raw(store, "photos", 0, blobs)
    write_raw(store, "photos", 1, blobs[:3] + [blobs[3][: len(blobs[3]) // 3]], first_id=100)
    register_cnn(store, "cnn3", 3)
    good, bad = extract_all(settings, "photos", "cnn3")
    assert (good["status"], good["rows"]) == ("done", 20)
    assert bad["status"] == "quarantined" and "id 103: not a decodable image" in bad["reason"]
    want_px = decode_images(blobs, np.arange(20), (28, 28), "RGB")
    bb, _ = load_backbone(store, "cnn3")
    ft = read_table(store, layout.features_key("photos", "cnn3", 0))
    np.testing.assert_allclose(features_matrix(ft), plain_forward(store, "cnn3", bb.preprocess(want_px)),
                               rtol=1e-5, atol=1e-5)
    assert not store.exists(layout.features_key("photos", "cnn3", 1))


def test_cuda_without_a_gpu_falls_back_once_with_a_message_and_the_same_features(local_settings, caplog,
                                                                               monkeypatch):
    """device=cuda on a machine where torch sees no GPU: one WARNING naming the fallback and
    `make install GPU=1` (not one per shard), and features bit-identical to device=cpu."""
    monkeypatch.setattr(devices, "torch_cuda", lambda: False)
    monkeypatch.setattr(devices, "_warned", set())
    store = open_store(local_settings)
    px = np.random.default_rng(2).integers(0, 256, (3, 10, 28, 28), dtype=np.uint8)
    for part in range(3):
        write_raw(store, "g", part, [png(p) for p in px[part]], first_id=10 * part)
    register_cnn(store, "cnn1", 1)
    extract_all(local_settings, "g", "cnn1")
    cpu = [features_matrix(read_table(store, layout.features_key("g", "cnn1", p))) for p in range(3)]
    cuda = Settings.load(store=local_settings.store, device="cuda")
    with caplog.at_level(logging.WARNING, logger="infra.devices"):
        outcomes = extract_all(cuda, "g", "cnn1")
    assert [o["status"] for o in outcomes] == ["done"] * 3
    fallbacks = [r for r in caplog.records if "falling back to CPU" in r.getMessage()]
    assert len(fallbacks) == 1 and "make install GPU=1" in fallbacks[0].getMessage()
    assert "torch sees no CUDA device" in fallbacks[0].getMessage()
    for p in range(3):
        np.testing.assert_array_equal(features_matrix(read_table(store, layout.features_key("g", "cnn1", p))), cpu[p])


def test_torch_threads_are_set_for_the_block_and_restored(monkeypatch):
    """The flow's `torch_threads(n)`: n inside, task threads started inside inherit it, the previous
    count afterwards."""
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    seen = {}
    with devices.torch_threads(target):
        assert torch.get_num_threads() == target
        t = threading.Thread(target=lambda: seen.update(n=torch.get_num_threads()))
        t.start()
        t.join()
    assert seen["n"] == target and torch.get_num_threads() == before
    assert devices.shard_threads(10_000) == 1


def test_an_image_query_embeds_like_the_stored_row(local_settings):
    """`codeshard search --image` (infra.search.query_feature) decodes a JPEG the way the extract
    task does (RGB, resized): its feature equals that image's stored features row."""
    from infra.search import query_feature

    store = open_store(local_settings)
    rng = np.random.default_rng(3)
    blobs = [jpeg(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), (90 + 10 * i, 60)) for i in range(4)]
    write_raw(store, "q", 0, blobs)
    register_cnn(store, "cnn3", 3)
    extract_all(local_settings, "q", "cnn3")
    stored = features_matrix(read_table(store, layout.features_key("q", "cnn3", 0)))
    np.testing.assert_allclose(query_feature(store, "cnn3", image=blobs[2])[0], stored[2], rtol=1e-5, atol=1e-6)
