"""Wire bytes -> uint8 image arrays the model takes, with every check a client deserves.

Encoded images are decoded with Pillow (PNG, JPEG, WebP, BMP, GIF), turned upright by their
EXIF orientation, converted to the model's channels and resized to its input size. Raw
tensors are checked for dtype, shape, byte length and (for float32) finite values in 0..255.
Everything here raises InvalidInput with a message naming the problem.

What a hostile or unusual image gets (each is tested in tests/test_codec_edge_cases.py):
- more pixels than `max_pixels(spec)` (a decompression bomb), or a request whose images
  together declare more than 4x that: refused from the headers alone, before any pixel is
  decoded;
- truncated data: refused ("image file is truncated"), never half-decoded;
- animated GIF/WebP/PNG: the first frame;
- transparency (RGBA, LA, a palette or grey/RGB image with tRNS): composited onto black,
  the background of the images we train on;
- 16-bit greyscale: scaled to 8 bits (the top byte), not clipped;
- CMYK JPEG: converted to RGB (or L) by Pillow;
- an EXIF orientation tag: applied, so a phone photo is not sideways.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serving.contract import InputSpec
from serving.errors import InvalidInput

# A decompression bomb (a tiny file that decodes to gigapixels) is refused before decoding.
# 16 MP admits any phone photo and bounds one decode to ~64 MB and well under a second; a
# model whose own input is larger still accepts images of 4x its input size.
MAX_IMAGE_PIXELS = 16_000_000
REQUEST_PIXEL_FACTOR = 4  # a request's images together: 4x one image's limit
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF", "MPO"})


class NeedsThread(Exception):
    """The image declares more pixels than the caller will decode on its own thread (not the
    client's fault: decode it elsewhere)."""


def max_pixels(spec: InputSpec) -> int:
    """The most pixels an encoded image for this model may declare."""
    return max(MAX_IMAGE_PIXELS, 4 * spec.height * spec.width)


class PixelBudget:
    """The pixels a request's images may declare together: 256 images at the per-image limit
    in one message would be minutes of decoding."""

    def __init__(self, spec: InputSpec):
        self.total = self.left = REQUEST_PIXEL_FACTOR * max_pixels(spec)

    def spend(self, pixels: int) -> None:
        if pixels > self.left:
            raise InvalidInput(
                f"the request's images declare more than {self.total} pixels together"
            )
        self.left -= pixels


def decode_image(
    data: bytes,
    spec: InputSpec,
    inline_pixels: int | None = None,
    budget: PixelBudget | None = None,
) -> np.ndarray:
    """Encoded image bytes -> (C, H, W) uint8 for `spec`.

    inline_pixels: raise NeedsThread, from the header alone, for an image declaring more.
    budget: the request's pixel budget, which this image's declared size is taken from.
    """
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    limit = max_pixels(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise InvalidInput(f"unsupported image format {img.format}")
            w, h = img.size
            if w < 1 or h < 1:
                raise InvalidInput(f"image has zero size ({w}x{h})")
            if w * h > limit:
                raise InvalidInput(f"image is {w}x{h} = {w * h} pixels, over the limit of {limit}")
            if budget is not None:
                budget.spend(w * h)
            if inline_pixels is not None and w * h > inline_pixels:
                raise NeedsThread(f"{w}x{h}")
            img.seek(0)  # animated images: the first frame
            img = ImageOps.exif_transpose(img)
            img = _to_channels(img, spec.channels)
            if img.size != (spec.width, spec.height):
                img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own check (in Image.open) fires first for the very largest headers.
        raise InvalidInput(
            f"image refused as a decompression bomb: over the limit of {limit} pixels"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInput(
            "image bytes are not a recognised image format (PNG, JPEG, WebP, BMP or GIF)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInput(f"image could not be decoded: {exc}") from None
    if arr.ndim == 2:
        return arr[None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    mode = "L" if channels == 1 else "RGB"
    if img.mode == "I;16" or img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale: keep the top 8 bits rather than clipping everything to white.
        arr = np.asarray(img, dtype=np.uint32) >> 8
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # Transparent pixels become black, the background of the images we train on.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert(mode) if img.mode != mode else img


_DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}


def tensor_to_image(dtype: str, shape: tuple[int, ...], data: bytes, spec: InputSpec) -> np.ndarray:
    """A raw tensor (C,H,W), or (H,W) for one channel, -> (C, H, W) uint8 for `spec`."""
    if dtype not in _DTYPES:
        raise InvalidInput(f"tensor dtype must be uint8 or float32, got {dtype}")
    shape = tuple(int(d) for d in shape)
    ok = shape == spec.shape or (spec.channels == 1 and shape == (spec.height, spec.width))
    if not ok:
        raise InvalidInput(
            f"tensor shape {list(shape)} does not match the model input "
            f"[{spec.channels}, {spec.height}, {spec.width}]"
        )
    dt = _DTYPES[dtype]
    expected = spec.nbytes * dt.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"tensor data is {len(data)} bytes; shape {list(shape)} of {dtype} needs {expected}"
        )
    arr = np.frombuffer(data, dtype=dt).reshape(spec.shape)
    if dt == np.uint8:
        return arr
    return float_to_uint8(arr)


# A float32 pixel further than this from a whole value is not a pixel value: most likely
# 0..1 floats (torchvision's ToTensor), which rounding would make a black-and-white image.
WHOLE_PIXEL_TOLERANCE = 1e-3


def float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Whole float pixel values (0..255) -> uint8, refusing NaN, Inf, out-of-range values and
    fractions."""
    if not np.isfinite(arr).all():
        raise InvalidInput("float32 tensor contains NaN or Inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 255.0:
        raise InvalidInput(f"float32 pixel values must lie in 0..255, got {lo:g}..{hi:g}")
    whole = np.rint(arr)
    off = np.abs(arr - whole)
    worst = int(off.argmax())
    if off.flat[worst] > WHOLE_PIXEL_TOLERANCE:
        raise InvalidInput(
            f"float32 pixel values must be whole values 0..255 (got {arr.flat[worst]:g}): send "
            "unnormalised pixels, not 0..1 floats such as torchvision's ToTensor gives, or "
            "send uint8"
        )
    return whole.astype(np.uint8)
