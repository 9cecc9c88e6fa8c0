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
