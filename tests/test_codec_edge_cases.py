"""Unusual and hostile images through serving.codec.decode_image: what each one becomes.

The choices (also in the codec's docstring): bombs and truncated files are refused with
InvalidInput; animated images give their first frame; transparency is composited onto black;
16-bit greyscale keeps its top byte; CMYK is converted; EXIF orientation is applied.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.codec import (
    MAX_IMAGE_PIXELS,
    InputSpec,
    NeedsThread,
    PixelBudget,
    decode_image,
    max_pixels,
)
from serving.errors import InvalidInput
from tests.image_files import png_declaring

GREY = InputSpec(1, 28, 28)
RGB = InputSpec(3, 28, 28)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def refused(data: bytes, spec: InputSpec = GREY) -> str:
    with pytest.raises(InvalidInput) as err:
        decode_image(data, spec)
    return str(err.value)


# ----------------------------------------------------------------------------- bombs
@pytest.mark.parametrize("side", [30_000, 65_535])
def test_a_decompression_bomb_is_refused_from_its_header(side):
    # ~100 bytes declaring up to 4.3 G pixels; its stub pixel data would fail as truncated
    # if decoding (gigabytes) had started.
    message = refused(png_declaring(side, side))
    assert "decompression bomb" in message and f"{MAX_IMAGE_PIXELS}" in message
    assert "truncated" not in message


def test_an_image_over_the_pixel_limit_is_refused_before_its_pixels_are_decoded():
    # The stub pixel data would fail as truncated if decoding had started.
    message = refused(png_declaring(5000, 4000))
    assert "5000x4000" in message and "over the limit" in message
    assert "truncated" not in message


def test_the_pixel_limit_grows_with_a_large_model_input():
    assert max_pixels(GREY) == MAX_IMAGE_PIXELS
    big = InputSpec(3, 4096, 4096)
    assert max_pixels(big) == 4 * 4096 * 4096
    # Within a large model's limit, the same header gets as far as decoding (and is truncated).
    assert "truncated" in refused(png_declaring(5000, 4000), big)


def test_a_requests_images_share_a_pixel_budget_of_four_times_the_image_limit():
    budget = PixelBudget(GREY)
    assert budget.total == 4 * MAX_IMAGE_PIXELS
    for _ in range(4):  # each within the budget: decoded (and found truncated)
        with pytest.raises(InvalidInput, match="truncated"):
            decode_image(png_declaring(4000, 4000), GREY, budget=budget)
    with pytest.raises(InvalidInput, match="declare more than 64000000 pixels together"):
        decode_image(png_declaring(4000, 4000), GREY, budget=budget)


def test_an_image_declaring_more_than_inline_pixels_asks_for_a_thread_from_its_header():
    # The stub pixel data would fail as truncated if decoding had started.
    with pytest.raises(NeedsThread):
        decode_image(png_declaring(2000, 2000), GREY, inline_pixels=512 * 512)
    with pytest.raises(InvalidInput, match="truncated"):  # under the bound: decoded here
        decode_image(png_declaring(500, 500), GREY, inline_pixels=512 * 512)


# ----------------------------------------------------------------------------- broken files
def noise(h: int = 64, w: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9])
def test_a_truncated_png_or_jpeg_is_refused_not_half_decoded(fmt, keep):
    data = encode(noise(), fmt)
    message = refused(data[: int(len(data) * keep)])
    assert "truncated" in message or "could not be decoded" in message


@pytest.mark.parametrize(
    "data", [b"", png_declaring(0, 10), png_declaring(10, 0)], ids=["empty", "w0", "h0"]
)
def test_empty_bytes_and_zero_size_images_are_refused(data):
    assert refused(data)


def test_a_format_outside_the_list_is_refused_by_name():
    assert "TIFF" in refused(encode(noise(), "TIFF"))


# ----------------------------------------------------------------------------- modes
def test_cmyk_jpeg_becomes_the_right_rgb_and_grey():
    red = encode(Image.new("CMYK", (28, 28), (0, 255, 255, 0)), "JPEG", quality=100)
    rgb = decode_image(red, RGB).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(rgb, [255, 0, 0], atol=3)
    grey = decode_image(red, GREY).mean()
    assert abs(grey - 0.299 * 255) < 3  # ITU-R 601 luma of pure red


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped():
    levels = np.array([0, 255, 256, 100 * 257, 32768, 65535], dtype=np.uint16)
    img = Image.fromarray(np.tile(levels, (28, 1))[:, np.arange(28) % 6].astype(np.uint16))
    assert Image.open(io.BytesIO(encode(img, "PNG"))).mode == "I;16"
    out = decode_image(encode(img, "PNG"), GREY)[0, 0, :6]
    assert out.tolist() == [0, 0, 1, 100, 128, 255]


def test_palette_transparency_is_composited_onto_black():
    img = Image.new("P", (28, 28), 0)
    img.putpalette([255, 255, 255, 200, 50, 10] + [0] * 762)
    img.paste(1, (0, 0, 14, 28))  # left half: opaque colour 1; right half: transparent white
    out = decode_image(encode(img, "PNG", transparency=0), RGB)
    assert out[:, :, :14].reshape(3, -1).T.tolist() == [[200, 50, 10]] * 28 * 14
    assert not out[:, :, 14:].any()


@pytest.mark.parametrize("mode,colour", [("L", 200), ("RGB", (10, 20, 30))])
def test_a_transparent_colour_key_in_grey_or_rgb_is_black_too(mode, colour):
    img = Image.new(mode, (28, 28), colour)
    assert not decode_image(encode(img, "PNG", transparency=colour), GREY).any()


def test_half_transparent_pixels_are_blended_with_black():
    img = Image.new("RGBA", (28, 28), (200, 100, 50, 128))
    out = decode_image(encode(img, "PNG"), RGB)[:, 0, 0]
    np.testing.assert_allclose(out, [100, 50, 25], atol=1)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animated_image_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (28, 28), (v, v, v)) for v in (40, 160, 250)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert np.unique(decode_image(data, GREY)).tolist() == [40]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_is_applied_so_a_phone_photo_is_upright(fmt):
    # Stored 40 wide x 20 high, left half white; orientation 6 = "rotate 90° clockwise to view".
    img = Image.new("L", (40, 20), 0)
    img.paste(255, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(
        encode(img, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {})),
        InputSpec(1, 40, 20),
    )
    # Upright it is 20 wide x 40 high with the white half on top.
    assert out[0, :18].mean() > 240 and out[0, 22:].mean() < 15
