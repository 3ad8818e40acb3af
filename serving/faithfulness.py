"""How faithful an explanation is, measured as the field measures it, not by eye.

- **Pointing game** (Zhang et al., 2016): a hit when the explanation's peak lies inside the
  object's bounding box. On these datasets the object is every pixel > 0 (the backgrounds
  are black), so the box is that of the non-zero pixels.
- **Deletion / insertion** (Petsiuk et al., RISE, 2018): remove the pixels the explanation
  ranks most important first (set them to the background value) and follow the target
  probability: a faithful map makes it fall fast (low area under the curve). Insertion runs
  the other way, from a blank image, adding the most important pixels first (high area).
  A random order of the same pixels is the yardstick a map must beat.
- **Peak on background**: how often the peak's 3x3 neighbourhood is all zero. Background can
  be real evidence (the gap between a trouser's legs), so this is reported, not forbidden.

Pure numpy: the bench, the tests and the report share it; the caller runs the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) uint8 -> (N, K) probabilities


def object_box(image: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end exclusive, of the pixels > 0 in any channel; None if blank."""
    mask = image.max(axis=0) > 0
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def pointing_hit(image: np.ndarray, x: float, y: float) -> bool:
    """Whether the point (x, y), in pixel coordinates, lies inside the object's box."""
    box = object_box(image)
    return box is not None and box[0] <= x < box[2] and box[1] <= y < box[3]


def on_background(image: np.ndarray, x: float, y: float) -> bool:
    """Whether the 3x3 pixels around (x, y) are all 0 (pure background)."""
    h, w = image.shape[1:]
    cx, cy = min(int(x), w - 1), min(int(y), h - 1)
    window = image[:, max(0, cy - 1) : cy + 2, max(0, cx - 1) : cx + 2]
    return not window.any()


def pixel_peak(saliency: np.ndarray) -> tuple[float, float]:
    """(x, y) centre of the 3x3 window with the largest mean saliency (a single pixel's
    gradient is noisy; a region's is not)."""
    padded = np.pad(np.nan_to_num(saliency.astype(np.float64)), 1, mode="edge")
    smooth = np.lib.stride_tricks.sliding_window_view(padded, (3, 3)).mean(axis=(-2, -1))
    i, j = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    return j + 0.5, i + 0.5


def ranking(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel indices (row-major) from most to least important; ties (a patch's pixels share
    one value) broken at random, so no order is favoured by its position."""
    flat = np.nan_to_num(saliency.astype(np.float64), nan=-np.inf).ravel()
    return np.lexsort((rng.random(flat.size), -flat))


def curve_rows(
    image: np.ndarray, order: np.ndarray, steps: int, insertion: bool, fill: int = 0
) -> np.ndarray:
    """(steps + 1, C, H, W): the image with the first k / steps of `order` deleted (set to
    `fill`), or for insertion a `fill` canvas with them inserted, k = 0..steps."""
    c, h, w = image.shape
    n = h * w
    rows = np.empty((steps + 1, c, h, w), dtype=np.uint8)
    for s in range(steps + 1):
        chosen = order[: round(n * s / steps)]
        mask = np.zeros(n, dtype=bool)
        mask[chosen] = True
        mask = mask.reshape(h, w)
        if insertion:
            rows[s] = np.where(mask, image, fill)
        else:
            rows[s] = np.where(mask, fill, image)
    return rows


def area(curve: np.ndarray) -> float:
    """Area under a probability curve sampled at evenly spaced fractions 0..1."""
    y = np.asarray(curve, dtype=np.float64)
    return float(((y[1:] + y[:-1]) / 2).mean())


@dataclass(frozen=True)
class Scores:
    """One method's figures over a sample (fractions and mean areas)."""

    images: int
    pointing: float  # share of peaks inside the object's box
    background: float  # share of peaks on pure background
    deletion: float  # mean deletion AUC (lower is better)
    insertion: float  # mean insertion AUC (higher is better)
    random_deletion: float  # the same images, pixels deleted in random order
    random_insertion: float


def evaluate(
    images: np.ndarray,
    targets: np.ndarray,
    saliencies: np.ndarray,
    peaks: np.ndarray,
    predict: Predict,
    steps: int = 28,
    seed: int = 0,
) -> Scores:
    """Scores of one method: `saliencies` (N, H, W) per-pixel maps, `peaks` (N, 2) their
    (x, y) peaks, for the (N, C, H, W) uint8 `images` and their `targets` classes."""
    rng = np.random.default_rng(seed)
    hits = bg = 0
    dels, ins, rdels, rins = [], [], [], []
    for image, target, sal, (x, y) in zip(images, targets, saliencies, peaks, strict=True):
        hits += pointing_hit(image, x, y)
        bg += on_background(image, x, y)
        order = ranking(sal, rng)
        random_order = rng.permutation(order.size)
        rows = np.concatenate(
            [
                curve_rows(image, o, steps, insertion)
                for o in (order, random_order)
                for insertion in (False, True)
            ]
        )
        p = predict(rows)[:, target].reshape(4, steps + 1)
        dels.append(area(p[0]))
        ins.append(area(p[1]))
        rdels.append(area(p[2]))
        rins.append(area(p[3]))
    n = len(images)
    return Scores(
        images=n,
        pointing=hits / n,
        background=bg / n,
        deletion=float(np.mean(dels)),
        insertion=float(np.mean(ins)),
        random_deletion=float(np.mean(rdels)),
        random_insertion=float(np.mean(rins)),
    )
