"""Model and coder registry in the store: `models/<id>/model.pt + card.json`, `coders/<id>/…`.

Weights are saved with `torch.save` and loaded only from the configured store with
`torch.load(weights_only=True)`. A card records lineage and metrics plus the checksum of the
weights, which is the `code_version` that downstream manifests key on.

Cards are read from the store, so they are untrusted input: every field that reaches code (arch,
arch_kwargs, checksum, projection, input_hw) is checked against an allow-list (`check_model_card`,
`encoders.backbones.check_arch_kwargs`) before anything is built; other fields are data only.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
from typing import Any

import torch

from infra import layout
from infra.store import NotFound, Store

LOG = logging.getLogger(__name__)

PRETRAINED = {
    # model_id -> (arch, constructor kwargs); registered into the store on first use.
    "efficientnet-lite0-64": ("efficientnet-lite0", {"input_size": 64}),
    "minilm": ("minilm", {}),
}
PACKAGE_ARCHS = frozenset({"minilm"})  # the archs whose weights are not in the store ("package" checksum)


class RegistryError(LookupError):
    pass


class CardInvalid(ValueError):
    """A model card from the store that fails the allow-list: nothing is built from it."""


CHECKSUM = re.compile(r"^(?:[0-9a-f]{16}|package)$")


def check_model_card(card: Any, model_id: str) -> dict[str, Any]:
    """`card` if the fields that reach code are allowed: `model_id` itself, a known arch with allowed
    constructor arguments (no paths), a weights checksum (16 hex digits, or 'package' for a model
    whose weights ship in its installed package), an optional projection {in_dim, out_dim} and
    input_hw [h, w] of small positive ints. Raises CardInvalid naming the field. Pure."""
    from encoders.backbones import check_arch_kwargs

    def small_ints(value: Any, n: int, what: str) -> None:
        if (not isinstance(value, list) or len(value) != n
                or not all(type(v) is int and 1 <= v <= 65536 for v in value)):
            raise CardInvalid(f"model {model_id}: {what} must be {n} ints in [1, 65536], got {value!r}"[:200])

    if not isinstance(card, dict) or card.get("model_id") != model_id:
        raise CardInvalid(f"model {model_id}: card.json is not this model's card")
    if not isinstance(card.get("checksum"), str) or not CHECKSUM.match(card["checksum"]):
        raise CardInvalid(f"model {model_id}: checksum must be 16 hex digits or 'package'")
    kwargs = card.get("arch_kwargs", {})
    if not isinstance(kwargs, dict):
        raise CardInvalid(f"model {model_id}: arch_kwargs must be an object")
    try:
        check_arch_kwargs(card.get("arch"), kwargs)
    except ValueError as e:
        raise CardInvalid(f"model {model_id}: {e}") from None
    if card["checksum"] == "package" and card["arch"] not in PACKAGE_ARCHS:
        raise CardInvalid(f"model {model_id}: only {sorted(PACKAGE_ARCHS)} load weights from a package")
    if card.get("projection") is not None:
        p = card["projection"]
        small_ints([p.get("in_dim"), p.get("out_dim")] if isinstance(p, dict) else p, 2, "projection in_dim/out_dim")
    if "input_hw" in card:
        small_ints(card["input_hw"], 2, "input_hw")
    return card


def _save(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def read_card(store: Store, prefix: str) -> dict[str, Any]:
    try:  # any other StoreError (unreachable store, missing bucket) propagates: not "unknown model"
        return json.loads(store.read_bytes(prefix + "card.json"))
    except NotFound:
        raise RegistryError(f"nothing registered at {store.uri_of(prefix)} (no card.json)") from None


def write_card(store: Store, prefix: str, card: dict[str, Any]) -> None:
    store.write_bytes(prefix + "card.json", json.dumps(card, indent=2, sort_keys=True, default=str).encode())


# -- models -----------------------------------------------------------------------------------
def register_model(store: Store, model_id: str, arch: str, arch_kwargs: dict[str, Any],
                   state_dict: dict[str, torch.Tensor] | None, card: dict[str, Any],
                   extra: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Publish weights (and `extra` state dicts such as 'head.pt'), then the card: the card is the
    commit point, so a half-registered model is invisible. Returns the card."""
    prefix = layout.model_prefix(model_id)
    for name, sd in (extra or {}).items():
        store.write_bytes(prefix + name, _save(sd))
    checksum = "package"
    if state_dict is not None:
        data = _save(state_dict)
        checksum = hashlib.sha256(data).hexdigest()[:16]
        store.write_bytes(prefix + "model.pt", data)
    full = {**card, "model_id": model_id, "arch": arch, "arch_kwargs": arch_kwargs,
            "checksum": checksum, "registered_at": time.time()}
    write_card(store, prefix, full)
    LOG.info("registered model %s (%s, checksum %s)", model_id, arch, checksum)
    return full


def model_card(store: Store, model_id: str) -> dict[str, Any]:
    """The card of `model_id`, checked (`check_model_card`); pretrained ids are registered into the
    store on first use."""
    try:
        return check_model_card(read_card(store, layout.model_prefix(model_id)), model_id)
    except RegistryError:
        if model_id not in PRETRAINED:
            raise RegistryError(f"unknown model {model_id!r}: train one with `codeshard train-backbone` "
                                f"or use a pretrained id {sorted(PRETRAINED)}") from None
    arch, kwargs = PRETRAINED[model_id]
    from encoders.backbones import build_backbone

    bb = build_backbone(arch, **kwargs)
    sd = bb.module.state_dict() if isinstance(bb.module, torch.nn.Module) else None
    card = {"source": "pretrained package weights", "data": "ImageNet" if sd is not None else "package"}
    return register_model(store, model_id, arch, kwargs, sd, card)


def image_input(card: dict[str, Any]) -> tuple[tuple[int, int], str]:
    """((H, W), PIL mode) the images of `card`'s model are decoded to: 'RGB' for EfficientNet and
    3-channel CNNs, else 'L' (grey); H, W from the card's input_hw, else EfficientNet's input size,
    else 28 x 28."""
    kwargs = card.get("arch_kwargs", {})
    if card["arch"] == "efficientnet-lite0":
        size = int(kwargs.get("input_size", 64))
        return tuple(card.get("input_hw", (size, size))), "RGB"
    return tuple(card.get("input_hw", (28, 28))), "RGB" if kwargs.get("in_ch", 1) == 3 else "L"


def load_backbone(store: Store, model_id: str, device: str = "cpu"):
    """(Backbone, card) for `model_id`, weights read from the store. Cached per (store, id, checksum)."""
    card = model_card(store, model_id)
    key = (store.uri, model_id, card["checksum"], device)
    with _CACHE_LOCK:
        if key not in _BACKBONES:
            _BACKBONES[key] = _build_backbone(store, card, device)
        return _BACKBONES[key], card


_CACHE_LOCK = threading.Lock()
_BACKBONES: dict[tuple, Any] = {}
_CODERS: dict[tuple, Any] = {}


def _build_backbone(store: Store, card: dict[str, Any], device: str):
    from encoders.backbones import build_backbone

    model_id, checksum = card["model_id"], card["checksum"]
    kwargs = dict(card.get("arch_kwargs", {}))
    if card["arch"] == "minilm":
        kwargs["device"] = device
    bb = build_backbone(card["arch"], **kwargs)
    if card.get("projection"):  # a compatible update: backbone -> linear map into the old space
        from encoders.backbones import Backbone
        from encoders.compat import ProjectedBackbone

        out_dim = int(card["projection"]["out_dim"])
        bb = Backbone(bb.arch, ProjectedBackbone(bb.module, bb.feature_dim, out_dim), bb.preprocess, out_dim)
    if isinstance(bb.module, torch.nn.Module):
        if checksum != "package":
            bb.module.load_state_dict(_load(store.read_bytes(layout.model_prefix(model_id) + "model.pt")))
        # channels_last conv weights: oneDNN's faster NHWC kernels on CPU
        # (BENCHMARKS.md section 1); loaded modules only run inference, so their state is never saved
        bb.module.to(device, memory_format=torch.channels_last).eval()
    return bb


def load_model_state(store: Store, model_id: str, name: str = "model.pt") -> dict[str, torch.Tensor]:
    """A state dict saved with the model ('model.pt', or an extra such as 'head.pt')."""
    return _load(store.read_bytes(layout.model_prefix(model_id) + name))


# -- coders -----------------------------------------------------------------------------------
def register_coder(store: Store, coder_id: str, state: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    prefix = layout.coder_prefix(coder_id)
    data = _save(state)
    checksum = hashlib.sha256(data).hexdigest()[:16]
    store.write_bytes(prefix + "coder.pt", data)
    full = {**card, "coder_id": coder_id, "method": state["method"], "checksum": checksum,
            "registered_at": time.time()}
    write_card(store, prefix, full)
    LOG.info("registered coder %s (%s, checksum %s)", coder_id, state["method"], checksum)
    return full


def coder_card(store: Store, coder_id: str) -> dict[str, Any]:
    return read_card(store, layout.coder_prefix(coder_id))


def load_coder(store: Store, coder_id: str):
    """(Coder, card), state read from the store with weights_only=True. Cached by checksum."""
    from encoders.coders import coder_from_state

    card = coder_card(store, coder_id)
    key = (store.uri, coder_id, card["checksum"])
    with _CACHE_LOCK:
        if key not in _CODERS:
            _CODERS[key] = coder_from_state(_load(store.read_bytes(layout.coder_prefix(coder_id) + "coder.pt")))
        return _CODERS[key], card


def read_pointer(store: Store, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(value, etag) of a named pointer such as the query model of a dataset; (None, None) when it
    was never set. A store failure raises (it is not 'no pointer')."""
    try:
        data, etag = store.read_with_etag(layout.pointer_key(name))
    except NotFound:
        return None, None
    return json.loads(data), etag


def move_pointer(store: Store, name: str, value: dict[str, Any], expected_etag: str | None) -> str:
    """Conditional move: succeeds only if the pointer still has `expected_etag` (None: absent)."""
    data = json.dumps(value, sort_keys=True).encode()
    if expected_etag is None:
        return store.put_if(layout.pointer_key(name), data, if_none_match=True)
    return store.put_if(layout.pointer_key(name), data, if_match=expected_etag)
