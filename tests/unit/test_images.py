from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from infra.images import BadImage, decode_images


def png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_and_resize():
    a = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    b = np.zeros((8, 8), np.uint8)
    out = decode_images([png(a), png(b)], np.array([1, 2]), (28, 28))
    assert out.shape == (2, 28, 28)
    np.testing.assert_array_equal(out[0], a)


@pytest.mark.parametrize("blob,match", [(b"not an image", "id 7: not a decodable image"), (None, "id 7: image is null")])
def test_bad_bytes_name_the_id(blob, match):
    with pytest.raises(BadImage, match=match):
        decode_images([blob], np.array([7]), (28, 28))


def test_huge_image_refused_without_decoding():
    big = Image.new("L", (5000, 5000))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(BadImage, match="exceeds"):
        decode_images([buf.getvalue()], np.array([9]), (28, 28))


def test_16_bit_grey_is_scaled_not_clipped():
    """A 16-bit PNG (0, 48, 255, 32 scaled by 257) decodes to 0, 48, 255, 32, not 0, 255, 255, 255."""
    a = (np.array([[0, 48, 255, 32]], np.uint16) * 257).astype(np.uint16)
    assert Image.open(io.BytesIO(png(a))).mode.startswith("I;16")
    out = decode_images([png(a)], np.array([3]), (1, 4))
    np.testing.assert_array_equal(out[0], [[0, 48, 255, 32]])


def test_float_image_is_refused_with_a_reason():
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(buf, format="TIFF")
    with pytest.raises(BadImage, match="id 4: floating-point image"):
        decode_images([buf.getvalue()], np.array([4]), (4, 4))


def jpeg(im, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def gradient_rgb(w: int, h: int) -> Image.Image:
    """A smooth colour image (JPEG keeps it within a few grey levels)."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8), "RGB")


def test_rgb_jpegs_of_different_sizes_and_modes_decode_to_one_rgb_shape():
    """Real JPEG bytes (RGB 300x200, 64x48 and 28x28, grey 50x70, CMYK 40x40) and an RGBA and a
    palette PNG all come out (n, 28, 28, 3) uint8; each equals Pillow's decode + RGB + resize of
    the same bytes within JPEG's own rounding, and grey repeats its value in the 3 channels."""
    rgb_big, rgb_small = gradient_rgb(300, 200), gradient_rgb(64, 48)
    grey = Image.fromarray(np.tile(np.linspace(0, 255, 50).astype(np.uint8), (70, 1)), "L")
    cmyk = gradient_rgb(40, 40).convert("CMYK")
    rgba = gradient_rgb(30, 20).convert("RGBA")
    pal = gradient_rgb(30, 30).convert("P")
    blobs = [jpeg(rgb_big), jpeg(rgb_small), jpeg(gradient_rgb(28, 28)), jpeg(grey), jpeg(cmyk), png_image(rgba),
             png_image(pal)]
    out = decode_images(blobs, np.arange(len(blobs)), (28, 28), "RGB")
    assert out.shape == (7, 28, 28, 3) and out.dtype == np.uint8
    for i, blob in enumerate(blobs):
        ref = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((28, 28), Image.BILINEAR), np.int16)
        # the 300x200 JPEG is decoded at a reduced DCT scale first: close to the full decode, not equal
        tol = 12 if i == 0 else 0
        assert np.abs(out[i].astype(np.int16) - ref).max() <= tol, i
    assert (out[3, ..., 0] == out[3, ..., 1]).all() and (out[3, ..., 1] == out[3, ..., 2]).all()
    # the same bytes as grey: 2-D per image, Pillow's luma of the colour
    grey_out = decode_images(blobs[1:3], np.arange(2), (28, 28), "L")
    assert grey_out.shape == (2, 28, 28)
    ref = np.asarray(Image.open(io.BytesIO(blobs[2])).convert("L"), np.int16)
    assert np.abs(grey_out[1].astype(np.int16) - ref).max() == 0


def png_image(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_jpeg_exif_orientation_is_applied():
    """A JPEG stored landscape with EXIF orientation 6 (rotate 90° clockwise to view) decodes upright:
    its left column (red) becomes the top row."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # left quarter red
    im = Image.fromarray(a, "RGB")
    exif = im.getexif()
    exif[0x0112] = 6
    out = decode_images([jpeg(im, exif=exif.tobytes())], np.array([5]), (40, 20), "RGB")
    assert out.shape == (1, 40, 20, 3)
    top, bottom = out[0, :8].mean(axis=(0, 1)), out[0, -8:].mean(axis=(0, 1))
    assert top[0] > 200 and top[1] < 60 and bottom[0] < 60


def test_truncated_jpeg_names_the_id():
    """A JPEG cut in half is refused with the row's id (the extract task quarantines its shard with it)."""
    good = jpeg(gradient_rgb(64, 64))
    with pytest.raises(BadImage, match="id 12: not a decodable image"):
        decode_images([good, good[: len(good) // 2]], np.array([11, 12]), (28, 28), "RGB")


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'L' or 'RGB'"):
        decode_images([png(np.zeros((4, 4), np.uint8))], np.array([1]), (4, 4), "CMYK")
