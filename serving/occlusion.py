"""Occlusion sensitivity, defined once for the server, the report and the tests.

Slide a square patch over the image, hide what it covers and record how much the target
class's probability drops relative to the unoccluded image: one value per patch position,
positive where the region supports the class. It costs 1 + P forward passes for P
positions. Pure numpy (plus Pillow for the overlay and the blur): no torch, no gRPC.

The defaults were chosen by measuring faithfulness (serving/faithfulness.py, `make
bench-explain`; BENCHMARKS.md "Explanation quality"): a patch is hidden with the image's own
background (a grey training-mean square painted on a black background is itself something
the model reacts to: its peak fell on pure background for 20% of test images), and the
patch is a seventh of the image's side, non-overlapping (7x7 positions on 28x28).

The work is split so a caller can run the rows however it likes (the server sends them
through its batcher, the report through PyTorch or ONNX Runtime): `occluded_rows` builds the
1 + P images, `heatmap_from` turns their probabilities into the heatmap, and `occlusion`
does both around a plain `predict` function.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

Predict = Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) uint8 -> (N, K) probabilities


class OcclusionError(ValueError):
    """Patch size or stride outside their bounds for this image."""


@dataclass(frozen=True)
class Grid:
    """Where the patch goes: `rows` x `cols` positions, `stride` apart, `patch` pixels wide."""

    patch: int
    stride: int
    rows: int
    cols: int

    @property
    def positions(self) -> int:
        return self.rows * self.cols

    @property
    def forward_passes(self) -> int:
        return 1 + self.positions


DEFAULT_FILL = "background"


def default_patch(height: int, width: int) -> int:
    """A seventh of the shorter side, at least 1 (4 on 28x28 and 32x32)."""
    return max(1, min(height, width) // 7)


def grid(height: int, width: int, patch: int = 0, stride: int = 0) -> Grid:
    """The patch grid for an image; 0 means the default (patch: a seventh, stride: patch)."""
    patch = patch or default_patch(height, width)
    stride = stride or patch
    if not 1 <= patch <= min(height, width):
        raise OcclusionError(f"patch_size must be in 1..{min(height, width)}, got {patch}")
    if not 1 <= stride <= min(height, width):
        raise OcclusionError(f"stride must be in 1..{min(height, width)}, got {stride}")
    return Grid(patch, stride, (height - patch) // stride + 1, (width - patch) // stride + 1)


def fill_value(mean: Sequence[float]) -> np.ndarray:
    """The training mean (fractions of 255, per channel) as uint8 pixels, shape (C, 1, 1)."""
    pixels = np.rint(np.asarray(mean, dtype=np.float64) * 255.0).clip(0, 255)
    return pixels.astype(np.uint8).reshape(-1, 1, 1)


FILLS = ("train_mean", "background", "image_mean", "blur")


def baseline_fill(image: np.ndarray, kind: str, mean: Sequence[float], patch: int) -> np.ndarray:
    """What hides a patch: the training mean pixel (C, 1, 1); the image's own background (the
    median of its border pixels); its mean pixel; or a blur of the image itself (C, H, W),
    which keeps a patch's coarse content and removes its detail."""
    if kind == "train_mean":
        return fill_value(mean)
    if kind == "background":
        border = np.concatenate(
            [image[:, 0], image[:, -1], image[:, 1:-1, 0], image[:, 1:-1, -1]], axis=1
        )
        return np.median(border, axis=1).astype(np.uint8).reshape(-1, 1, 1)
    if kind == "image_mean":
        return np.rint(image.mean(axis=(1, 2))).astype(np.uint8).reshape(-1, 1, 1)
    if kind == "blur":
        radius = max(1.0, patch / 2)
        planes = [
            np.asarray(Image.fromarray(ch).filter(ImageFilter.GaussianBlur(radius))) for ch in image
        ]
        return np.stack(planes).astype(np.uint8)
    raise OcclusionError(f"occlusion fill must be one of {FILLS}, got {kind!r}")


def occluded_rows(image: np.ndarray, g: Grid, fill: np.ndarray) -> np.ndarray:
    """(1 + P, C, H, W) uint8: the image itself, then one copy per patch position (row-major),
    the patch replaced by `fill`: one pixel value (C, 1, 1), or the same place of a whole
    replacement image (C, H, W)."""
    rows = np.repeat(image[None], g.forward_passes, axis=0)
    whole = fill.shape[1:] == image.shape[1:]
    for i in range(g.rows):
        for j in range(g.cols):
            y, x = i * g.stride, j * g.stride
            patch = fill[:, y : y + g.patch, x : x + g.patch] if whole else fill
            rows[1 + i * g.cols + j, :, y : y + g.patch, x : x + g.patch] = patch
    return rows


@dataclass(frozen=True)
class Occlusion:
    heatmap: np.ndarray  # (rows, cols) float32: p(target | image) - p(target | occluded)
    target: int
    probabilities: np.ndarray  # (K,) of the unoccluded image
    grid: Grid

    @property
    def forward_passes(self) -> int:
        return self.grid.forward_passes


def heatmap_from(probabilities: np.ndarray, g: Grid, target: int | None = None) -> Occlusion:
    """The heatmap from the (1 + P, K) probabilities of `occluded_rows`' images.

    `target` None tracks the unoccluded image's top-1 class.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    base = probabilities[0]
    if target is None:
        target = int(base.argmax())
    if not 0 <= target < len(base):
        raise OcclusionError(f"target class must be in 0..{len(base) - 1}, got {target}")
    drop = base[target] - probabilities[1:, target]
    return Occlusion(drop.reshape(g.rows, g.cols).astype(np.float32), target, base, g)


def occlusion(
    image: np.ndarray,
    predict: Predict,
    mean: Sequence[float],
    *,
    patch: int = 0,
    stride: int = 0,
    target: int | None = None,
    fill: str = DEFAULT_FILL,
) -> Occlusion:
    """Occlusion sensitivity of one (C, H, W) uint8 image under `predict` (1 + P rows)."""
    g = grid(image.shape[1], image.shape[2], patch, stride)
    rows = occluded_rows(image, g, baseline_fill(image, fill, mean, g.patch))
    return heatmap_from(predict(rows), g, target)


def upsample(heatmap: np.ndarray, g: Grid, height: int, width: int) -> np.ndarray:
    """Per-pixel sensitivity: each pixel gets the mean of the cells whose patch covers it
    (NaN where no patch reaches, e.g. a margin the stride skips)."""
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.float64)
    for i in range(g.rows):
        for j in range(g.cols):
            y, x = i * g.stride, j * g.stride
            total[y : y + g.patch, x : x + g.patch] += heatmap[i, j]
            count[y : y + g.patch, x : x + g.patch] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(np.float32)


def pixel_map(heatmap: np.ndarray, g: Grid, image: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Per-pixel sensitivity: each pixel's share of its patches' drop, in proportion to how
    much hiding it changed it (|pixel - fill|). A pixel the fill leaves as it was (black
    background under a black fill) was not hidden, so it carries none of the evidence."""
    changed = np.abs(image.astype(np.float32) - fill.astype(np.float32)).mean(axis=0) / 255
    return upsample(heatmap, g, image.shape[1], image.shape[2]) * changed


def peak(heatmap: np.ndarray, g: Grid) -> tuple[float, float]:
    """(x, y) input-pixel centre of the most sensitive place in the heatmap.

    With overlapping patches (stride < patch) one position alone is noisy: a patch that
    clips an object's edge can spike while its neighbours, which cover the object, agree
    on a lower drop. So the map is first averaged over a window of the neighbouring
    positions whose patches overlap (patch // stride a side, made odd; edges replicated)
    and the peak is that average's maximum. Without overlap the window is one position
    and this is the plain argmax.
    """
    k = max(1, g.patch // g.stride)
    k -= 1 - k % 2
    smooth = heatmap.astype(np.float64)
    if k > 1:
        padded = np.pad(smooth, k // 2, mode="edge")
        smooth = np.lib.stride_tricks.sliding_window_view(padded, (k, k)).mean(axis=(-2, -1))
    i, j = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    return j * g.stride + g.patch / 2, i * g.stride + g.patch / 2


def overlay_png(image: np.ndarray, heatmap: np.ndarray, g: Grid, scale: int = 8) -> bytes:
    """The heatmap over the image as a PNG (`scale` x the image's size): red where hiding a
    region lowers the target's probability, blue where it raises it; the image shows in grey."""
    c, h, w = image.shape
    grey = image.mean(axis=0) if c > 1 else image[0].astype(np.float32)
    sens = np.nan_to_num(upsample(heatmap, g, h, w))
    top = float(np.abs(sens).max()) or 1.0
    strength = np.clip(np.abs(sens) / top, 0, 1)[..., None] * 0.6
    colour = np.where((sens >= 0)[..., None], [255.0, 40.0, 0.0], [0.0, 90.0, 255.0])
    rgb = grey[..., None].repeat(3, axis=2) * (1 - strength) + colour * strength
    img = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    img = img.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
