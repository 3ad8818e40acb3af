"""Image datasets as uint8 numpy arrays: loading, validation split and normalisation stats.

Uses only numpy, Pillow and the standard library (no torch), so the server-side report can
reuse it.
"""

from __future__ import annotations

import os

import numpy as np

from trainer.data.cifar import CIFAR10, load_cifar
from trainer.data.imagefolder import load_imagefolder
from trainer.data.mnist import FASHION_MNIST, MNIST, load_idx
from trainer.data.shapes import SHAPES_CLASSES, TEST_SEED_OFFSET, make_shapes
from trainer.data.types import DataError, Dataset, ImageSet

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "ImageSet",
    "channel_stats",
    "load_dataset",
    "split_validation",
]

DATASETS = ("fashion-mnist", "mnist", "cifar10", "imagefolder", "shapes")
_STATS_CHUNK_ELEMENTS = 1 << 22  # pixel values per chunk in channel_stats (8 MiB as uint16)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    image_size: int | None = None,
    channels: int | None = None,
    seed: int = 0,
    shapes_train: int = 6000,
    shapes_test: int = 1000,
) -> Dataset:
    """Load a dataset by name, locating, verifying or downloading its files as needed.

    ``data_dir`` is the folder holding the dataset's files (the image root for imagefolder,
    where it is required). ``image_size`` and ``channels`` apply to imagefolder (default 32
    and 3) and shapes (default 28 and 1); the fixed-size datasets accept only their own.
    ``seed`` drives imagefolder's test hold-out and the shapes generator.
    """
    if name == "fashion-mnist":
        _require_native(name, image_size, channels, size=28, n_channels=1)
        return load_idx(FASHION_MNIST, data_dir, download)
    if name == "mnist":
        _require_native(name, image_size, channels, size=28, n_channels=1)
        return load_idx(MNIST, data_dir, download)
    if name == "cifar10":
        _require_native(name, image_size, channels, size=32, n_channels=3)
        return load_cifar(CIFAR10, data_dir, download)
    if name == "imagefolder":
        if data_dir is None:
            raise DataError("imagefolder: pass --data-dir pointing at the image folder's root")
        return load_imagefolder(
            data_dir,
            image_size=32 if image_size is None else image_size,
            channels=3 if channels is None else channels,
            seed=seed,
        )
    if name == "shapes":
        size = 28 if image_size is None else image_size
        n_channels = 1 if channels is None else channels
        return Dataset(
            name="shapes",
            classes=SHAPES_CLASSES,
            train=make_shapes(shapes_train, size=size, channels=n_channels, seed=seed),
            test=make_shapes(
                shapes_test, size=size, channels=n_channels, seed=seed + TEST_SEED_OFFSET
            ),
        )
    raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _require_native(
    name: str, image_size: int | None, channels: int | None, *, size: int, n_channels: int
) -> None:
    if image_size not in (None, size) or channels not in (None, n_channels):
        raise DataError(
            f"{name} images are {n_channels}x{size}x{size}; image_size and channels can only "
            f"change imagefolder and shapes. Leave them unset for {name}"
        )


VAL_FRACTION, VAL_FLOOR, VAL_CAP = 0.1, 100, 5000


def default_val_size(n: int) -> int:
    """The validation split when a recipe names none: a tenth of the `n` training images,
    at least min(100, n // 2) and at most 5000 (Fashion-MNIST's 60,000 give 5,000; 2,400
    give 240; 150 give 75)."""
    return min(VAL_CAP, max(min(VAL_FLOOR, n // 2), round(VAL_FRACTION * n)))


def split_validation(train: ImageSet, val_size: int | None, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split ``train`` into (rest, validation) by a seeded random permutation.

    Both parts keep the original order of their images. ``val_size`` None takes
    `default_val_size`; 0 gives an empty validation set; one that leaves no training images
    is a DataError naming the recipe field.
    """
    if val_size is None:
        val_size = default_val_size(len(train))
    if not 0 <= val_size < len(train):
        raise DataError(
            f"data.val_size {val_size} must be at least 0 and below the {len(train)} training "
            f"images; set a smaller one (e.g. data.val_size={default_val_size(len(train))}) "
            "or leave it out for a tenth of them"
        )
    order = np.random.default_rng(seed).permutation(len(train))
    return train.subset(np.sort(order[val_size:])), train.subset(np.sort(order[:val_size]))


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images, in 0..1 units.

    Sums are exact integers accumulated a chunk at a time, so no copy of the whole array is
    ever made.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.size == 0:
        raise ValueError(
            f"expected non-empty uint8 (N, C, H, W) images, got {images.dtype} {images.shape}"
        )
    per_image = images[0].size
    rows = max(1, _STATS_CHUNK_ELEMENTS // per_image)
    total = np.zeros(images.shape[1], dtype=np.int64)
    total_sq = np.zeros(images.shape[1], dtype=np.int64)
    for start in range(0, len(images), rows):
        chunk = images[start : start + rows].astype(np.uint16)  # 255**2 still fits in uint16
        total += chunk.sum(axis=(0, 2, 3), dtype=np.int64)
        total_sq += (chunk * chunk).sum(axis=(0, 2, 3), dtype=np.int64)
    count = images.size // images.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in std)
