"""The report's figures: each function takes plain data (numpy, lists) and returns a Figure.

No torch here: the ONNX-only audit (`cnn-report --model`) draws with the same functions.
Images are (C, H, W) uint8 arrays, as everywhere in convserve.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "figure.dpi": 100})


def _show(ax: Any, image: np.ndarray, **kw: Any) -> None:
    """Draw a (C, H, W) uint8 image: grey for one channel, colour for three."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, **kw)
    else:
        ax.imshow(np.transpose(image, (1, 2, 0)), **kw)
    ax.set_xticks([])
    ax.set_yticks([])


def training_curves(history: Sequence[dict[str, Any]]) -> Figure:
    """Loss and accuracy per epoch (training and validation) and the learning rate."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), layout="constrained")
    for ax, key, name in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="training")
        val = [h.get(f"val_{key}") for h in history]
        if any(v is not None for v in val):
            ax.plot(epochs, [np.nan if v is None else v for v in val], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.set_ylabel(name)
        ax.set_title(f"{name} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[2].plot(epochs, [h["lr"] for h in history], "o-", color="tab:green")
    axes[2].set_xlabel("epoch")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_ylabel("learning rate (end of epoch)")
    axes[2].set_title("learning-rate schedule")
    axes[2].grid(alpha=0.3)
    return fig


def filter_grid(weights: np.ndarray) -> Figure:
    """First conv layer's filters (out, in, k, k): one small image each; colour for RGB."""
    n = len(weights)
    cols = min(n, 16)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.75, rows * 0.75 + 0.2))
    axes = np.atleast_1d(axes).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        w = weights[i]
        w = (w - w.min()) / (np.ptp(w) or 1.0)  # each filter on its own scale
        if w.shape[0] == 3:
            ax.imshow(np.transpose(w, (1, 2, 0)), interpolation="nearest")
        else:
            ax.imshow(w[0], cmap="gray", interpolation="nearest")
        ax.set_title(str(i), fontsize=7, pad=1)
    fig.subplots_adjust(wspace=0.15, hspace=0.35, left=0.01, right=0.99, top=0.9, bottom=0.01)
    return fig


def activation_maps(
    images: Sequence[np.ndarray],
    stages: Sequence[tuple[str, Sequence[np.ndarray]]],
    channels: int = 8,
) -> Figure:
    """For each image (rows) the input, then the first `channels` maps of each stage."""
    cols = 1 + channels * len(stages)
    fig, axes = plt.subplots(
        len(images), cols, figsize=(cols * 0.62, len(images) * 0.95 + 0.5), squeeze=False
    )
    for r, image in enumerate(images):
        _show(axes[r, 0], image)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
        for s, (name, maps) in enumerate(stages):
            m = maps[r]
            for c in range(channels):
                ax = axes[r, 1 + s * channels + c]
                ax.axis("off")
                if c < len(m):
                    ax.imshow(m[c], cmap="viridis", interpolation="nearest")
                if r == 0 and c == 0:
                    ax.set_title(f"{name} {m.shape[1]}x{m.shape[2]}", fontsize=8, loc="left")
    fig.subplots_adjust(wspace=0.08, hspace=0.08, left=0.01, right=0.99, top=0.85, bottom=0.02)
    return fig


def receptive_fields(
    image: np.ndarray, boxes: Sequence[tuple[str, tuple[int, int, int, int], int]]
) -> Figure:
    """One panel per stage: the input region (clipped box) its central unit can see."""
    fig, axes = plt.subplots(1, len(boxes), figsize=(2.3 * len(boxes), 2.7), squeeze=False)
    for ax, (name, (x0, y0, x1, y1), rf) in zip(axes[0], boxes, strict=True):
        _show(ax, image)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=2))
        ax.set_title(f"{name}\nRF {rf}x{rf} px", fontsize=9)
    fig.tight_layout()
    return fig


def top_patches(patches: Sequence[Sequence[np.ndarray]], channels: Sequence[int]) -> Figure:
    """Rows: last-conv channels; columns: the test patches (cropped to the unit's receptive
    field, black outside the image) that activate that channel most, strongest first."""
    rows, cols = len(patches), max(len(p) for p in patches)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 0.6, rows * 0.9), squeeze=False)
    for r, row in enumerate(patches):
        for c in range(cols):
            ax = axes[r, c]
            if c < len(row):
                _show(ax, row[c])
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(f"ch {channels[r]}", rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.08, right=0.99, top=0.99, bottom=0.01)
    return fig


def occlusion_maps(
    images: Sequence[np.ndarray], maps: Sequence[np.ndarray], titles: Sequence[str]
) -> Figure:
    """Per image: the image, and the per-pixel drop in the target class's probability."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n + 0.8, 4.2), squeeze=False)
    top = max(float(np.nanmax(np.abs(m))) for m in maps) or 1.0
    im = None
    for i, (image, m, title) in enumerate(zip(images, maps, titles, strict=True)):
        _show(axes[0, i], image)
        axes[0, i].set_title(title, fontsize=8)
        _show(axes[1, i], image)
        im = axes[1, i].imshow(m, cmap="RdBu_r", vmin=-top, vmax=top, alpha=0.75)
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("occlusion")
    cbar = fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.9)
    cbar.set_label("drop in p(target)")
    return fig


def confusion_matrix(cm: np.ndarray, classes: Sequence[str]) -> Figure:
    """Test-set counts: rows are true classes, columns predicted ones."""
    k = len(classes)
    size = max(4.5, 0.5 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size), layout="constrained")
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    hi = cm.max() or 1
    for i in range(k):
        for j in range(k):
            color = "white" if cm[i, j] > hi / 2 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=color)
    fig.colorbar(im, ax=ax, label="test images")
    return fig


def per_class_accuracy(accuracy: np.ndarray, classes: Sequence[str]) -> Figure:
    """Accuracy of each class on the test set, with the overall mean as a line."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(classes) + 1.5), 3.2), layout="constrained")
    ax.bar(range(len(classes)), accuracy * 100, color="tab:blue")
    ax.axhline(float(np.mean(accuracy)) * 100, color="tab:red", ls="--", label="mean")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("class")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    return fig


def mistakes(images: Sequence[np.ndarray], titles: Sequence[str]) -> Figure:
    """The most confident wrong predictions, each titled true -> predicted (probability)."""
    n = len(images)
    cols = min(n, 8)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.5, rows * 1.85), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i < n:
            _show(ax, images[i])
            ax.set_title(titles[i], fontsize=7)
        else:
            ax.axis("off")
    fig.tight_layout()
    return fig
