"""Decoding stored image bytes into model input, with the checks that protect a run."""
from __future__ import annotations

import io

import numpy as np

MAX_PIXELS = 4096 * 4096  # larger images are refused, not decoded (decompression bombs)


EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP")  # formats whose orientation tag is read before decoding


class BadImage(ValueError):
    pass


def decode_images(blobs: list[bytes | None], ids: np.ndarray, hw: tuple[int, int],
                  mode: str = "L") -> np.ndarray:
    """PNG/JPEG (or any Pillow format) bytes of any size -> uint8 pixels at `hw`: (n, H, W) for
    mode 'L' (grey), (n, H, W, 3) for 'RGB'.

    Each image is turned upright by its EXIF orientation (phone JPEGs), converted to `mode` and
    resized (bilinear, aspect ratio not kept) when its size differs; a JPEG at least twice `hw` is
    decoded at a reduced DCT scale first (Pillow's draft), which costs a fraction of a full decode.
    Grey -> RGB repeats the grey; RGB -> grey is Pillow's ITU-R 601 luma; alpha is dropped;
    palette and CMYK images are converted. 16-bit grey is scaled to 8 bits (v / 257, rounded:
    65535 -> 255), not clipped.
    Raises BadImage naming the first offending id for null, non-image, oversized bytes or a pixel
    format without a faithful 8-bit value (float, 32-bit integer past 16 bits).
    Cost: one decode per image on the calling thread (Pillow; a 28x28 PNG is tens of µs).
    """
    from PIL import Image, ImageOps

    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    out = np.empty((len(blobs), *hw, 3) if mode == "RGB" else (len(blobs), *hw), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        if blob is None:
            raise BadImage(f"id {int(ids[i])}: image is null")
        try:
            with Image.open(io.BytesIO(blob)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise BadImage(f"id {int(ids[i])}: image {w}x{h} exceeds {MAX_PIXELS} pixels")
                if im.format == "JPEG" and w >= 2 * hw[1] and h >= 2 * hw[0]:
                    im.draft(im.mode, (2 * hw[1], 2 * hw[0]))  # DCT scaling, never below twice the target
                if im.format in EXIF_FORMATS or "exif" in im.info:
                    im = ImageOps.exif_transpose(im)
                im = _grey8(im, int(ids[i]))
                if im.mode != mode:
                    im = im.convert(mode)
                if im.size != (hw[1], hw[0]):
                    im = im.resize((hw[1], hw[0]), Image.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8)
        except BadImage:
            raise
        except Exception as e:
            raise BadImage(f"id {int(ids[i])}: not a decodable image ({type(e).__name__})") from None
    return out


WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes for 16/32-bit integer grey


def _grey8(im, item_id: int):
    """`im` with 8-bit values: wide integer grey scaled to 'L' by 1/257 (Pillow's convert('L') clips
    it at 255: a 16-bit 0, 12336, 65535 became 0, 255, 255); float refused; other modes as they are."""
    from PIL import Image

    if im.mode in WIDE_GREY:
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise BadImage(f"id {item_id}: {im.mode} image with values outside 0..65535 (only 8- and 16-bit "
                           f"integer grey is converted)")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if im.mode == "F":
        raise BadImage(f"id {item_id}: floating-point image (mode F) has no defined 8-bit grey scale")
    return im
