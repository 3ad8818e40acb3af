"""A synthetic dataset of simple shapes on noisy backgrounds, with a bounding box per image.

Generated in-process and deterministic for a seed; nothing is downloaded. Each object is drawn
as a mask on a 4x supersampled canvas (for anti-aliased edges) and reduced; its box is the
tight bounding box of the mask's non-zero pixels, so it holds every pixel the object touches.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from trainer.data.types import DataError, ImageSet

SHAPES_CLASSES = ("circle", "square", "triangle", "line", "cross", "ring")
TEST_SEED_OFFSET = 1_000_003  # test set seed = train seed + this, so the two never coincide
_SUPERSAMPLE = 4
_MIN_SIZE = 8
_MIN_SIDE = 6  # smallest bounding-box side that still shows the shape


def make_shapes(
    n: int,
    *,
    size: int = 28,
    channels: int = 1,
    seed: int = 0,
    max_area_fraction: float = 0.25,
) -> ImageSet:
    """``n`` images (uint8, N x channels x size x size) of one shape each, classes balanced.

    Objects have random size, position (always wholly inside the image), rotation (except
    circles and rings), stroke width and intensity, on a background with gaussian noise;
    with ``channels=3`` the background and object colours are random too. Every object's
    bounding box covers at most ``max_area_fraction`` of the image.
    """
    if channels not in (1, 3):
        raise DataError(f"shapes: channels must be 1 or 3, got {channels}")
    if size < _MIN_SIZE:
        raise DataError(f"shapes: image size must be at least {_MIN_SIZE}, got {size}")
    if not 0 < max_area_fraction <= 1:
        raise DataError(f"shapes: max_area_fraction must be in (0, 1], got {max_area_fraction}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES)).astype(np.int64)
    max_side = min(size, math.floor(math.sqrt(max_area_fraction) * size))
    if max_side < _MIN_SIDE:
        raise DataError(
            f"shapes: max_area_fraction {max_area_fraction} leaves objects under {_MIN_SIDE} "
            f"pixels wide in {size}-pixel images; raise it or the image size"
        )
    masks = np.empty((n, size, size), dtype=np.uint8)
    boxes = np.empty((n, 4), dtype=np.float32)
    # Per image, uniform 0..1 draws for radius, centre x, centre y, stroke width and angle.
    params = rng.random((n, 5))
    for i, label in enumerate(labels):
        masks[i], boxes[i] = _draw(SHAPES_CLASSES[label], size, max_side, params[i])
    images = _paint(masks, channels, rng)
    return ImageSet(images, labels, boxes)


def _draw(shape: str, size: int, max_side: int, params: np.ndarray) -> tuple:
    """The anti-aliased mask of one ``shape`` and its tight box (x0, y0, x1, y1)."""
    radius = (0.5 + 0.5 * params[0]) * (max_side - 1) / 2  # drawn extent stays within 2 r + 1
    while True:
        mask = _draw_once(shape, size, radius, params)
        x0, y0, x1, y1 = mask.getbbox() or (0, 0, 0, 0)  # never empty: r >= 0.75 px draws a pixel
        # Rasterising can reach one pixel past the ideal extent; shrink and redraw if so.
        if (x1 - x0) * (y1 - y0) <= max_side * max_side:
            return np.asarray(mask), (x0, y0, x1, y1)
        radius *= 0.9


def _draw_once(shape: str, size: int, radius: float, params: np.ndarray) -> Image.Image:
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s))
    draw = ImageDraw.Draw(canvas)
    # Centre far enough from the edges that the whole object, including stroke, is inside.
    cx, cy = (radius + 0.5 + params[1:3] * (size - 2 * radius - 1)) * s
    r = radius * s
    # Strokes (line, cross, ring) are at least 1.5 pixels wide, so some pixel is mostly covered.
    width = max(round(1.5 * s), round((0.15 + 0.15 * params[3]) * r))
    angle = 2 * math.pi * params[4]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
    elif shape in ("square", "triangle"):
        corners = 4 if shape == "square" else 3
        draw.polygon(_polygon(cx, cy, r, angle, corners), fill=255)
    else:  # line and cross: segments whose ends stay within r, including half the stroke
        arm = r - width / 2
        for a in (angle, angle + math.pi / 2) if shape == "cross" else (angle,):
            dx, dy = arm * math.cos(a), arm * math.sin(a)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=width)
    return canvas.reduce(s)


def _polygon(cx: float, cy: float, r: float, angle: float, corners: int) -> list[tuple]:
    step = 2 * math.pi / corners
    return [
        (cx + r * math.cos(angle + k * step), cy + r * math.sin(angle + k * step))
        for k in range(corners)
    ]


def _paint(masks: np.ndarray, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Blend each mask between a background and a foreground colour, then add noise."""
    n = len(masks)
    background = rng.uniform(0, 255, size=(n, channels)).astype(np.float32)
    # The foreground differs from the background by 70..127 per channel, in a random direction
    # flipped where it would leave 0..255 (with a gap under 128 one direction always fits):
    # the object is always visible while its intensity and colour vary.
    gap = rng.uniform(70, 127, size=(n, channels)).astype(np.float32)
    up = rng.random((n, channels)) < 0.5
    up = np.where(up, background + gap <= 255, background - gap < 0)
    foreground = np.where(up, background + gap, background - gap)
    noise_std = rng.uniform(2, 8, size=(n, 1, 1, 1)).astype(np.float32)
    alpha = masks[:, None].astype(np.float32) / 255
    images = background[:, :, None, None] + alpha * (foreground - background)[:, :, None, None]
    images += rng.standard_normal(images.shape, dtype=np.float32) * noise_std
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)
