"""Decoding stored image bytes into model input, with the checks that protect a run."""
from __future__ import annotations

import io

import numpy as np

MAX_PIXELS = 4096 * 4096  # larger images are refused, not decoded (decompression bombs)


class BadImage(ValueError):
    pass


def decode_images(blobs: list[bytes | None], ids: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PNG/JPEG bytes -> (n, H, W) uint8 grey at `hw` (resized when needed).

    Raises BadImage naming the first offending id for null, non-image or oversized bytes.
    Cost: ~20 µs per 28x28 PNG on one core.
    """
    from PIL import Image

    out = np.empty((len(blobs), *hw), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        if blob is None:
            raise BadImage(f"id {int(ids[i])}: image is null")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadImage(f"id {int(ids[i])}: image {w}x{h} exceeds {MAX_PIXELS} pixels")
                if im.mode != "L":
                    im = im.convert("L")
                if (h, w) != hw:
                    im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8)
        except BadImage:
            raise
        except Exception as e:
            raise BadImage(f"id {int(ids[i])}: not a decodable image ({type(e).__name__})") from None
    return out
