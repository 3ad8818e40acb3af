"""A folder of image files, one sub-folder per class, decoded with Pillow.

Layout: ``root/train/<class>/...`` and ``root/test/<class>/...``; or ``root/<class>/...``,
in which case a seeded, stratified 20% of each class is held out as the test set.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from trainer.data.types import DataError, Dataset, ImageSet

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
TEST_FRACTION = 0.2
# Refuse images above 40 megapixels (a 28-to-64-pixel training image never needs more) so a
# decompression bomb fails cleanly; checked per image, leaving Pillow's global limit alone.
MAX_PIXELS = 40_000_000
_MODES = {1: "L", 3: "RGB"}


def load_imagefolder(
    root: str | os.PathLike, *, image_size: int = 32, channels: int = 3, seed: int = 0
) -> Dataset:
    """Decode every image under ``root`` to ``channels`` x ``image_size`` x ``image_size``.

    Classes are the sorted sub-folder names. Raises DataError for a missing root, no classes,
    an empty class folder, or a file Pillow cannot decode.
    """
    root = Path(root)
    if channels not in _MODES:
        raise DataError(f"imagefolder: channels must be 1 or 3, got {channels}")
    if image_size < 1:
        raise DataError(f"imagefolder: image_size must be positive, got {image_size}")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass --data-dir pointing at an image folder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _class_names(root / "train")
        train_files = _files_by_class(root / "train", classes, allow_empty=False)
        test_files = _files_by_class(root / "test", classes, allow_empty=True)
    else:
        classes = _class_names(root)
        train_files, test_files = _hold_out(_files_by_class(root, classes, allow_empty=False), seed)
    size, mode = (image_size, image_size), _MODES[channels]
    return Dataset(
        name="imagefolder",
        classes=classes,
        train=_decode_all(train_files, size, mode),
        test=_decode_all(test_files, size, mode),
    )


def _class_names(folder: Path) -> tuple[str, ...]:
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p)))
    if not names:
        raise DataError(
            f"{folder}: no class folders; put each class's images in its own sub-folder "
            f"({folder}/<class>/image.png)"
        )
    return names


def _files_by_class(
    folder: Path, classes: tuple[str, ...], *, allow_empty: bool
) -> list[tuple[Path, int]]:
    """(file, label) pairs for every image under folder/<class>/, in a stable order."""
    extra = sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p) and p.name not in classes
    )
    if extra:
        raise DataError(f"{folder}: class folders {extra} are not in the training set's {classes}")
    pairs = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in EXTENSIONS and p.is_file() and not _hidden(p)
        )
        if not files and not allow_empty:
            raise DataError(
                f"{class_dir}: no images (looked for {', '.join(sorted(EXTENSIONS))}); "
                f"add some or remove the folder"
            )
        pairs.extend((p, label) for p in files)
    return pairs


def _hold_out(
    pairs: list[tuple[Path, int]], seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Split each class at random into train and a TEST_FRACTION test share (at least one image
    of any class that has two or more)."""
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in pairs])
    is_test = np.zeros(len(pairs), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_test = max(1, round(TEST_FRACTION * len(members))) if len(members) > 1 else 0
        is_test[rng.permutation(members)[:n_test]] = True
    train = [pair for pair, test in zip(pairs, is_test, strict=True) if not test]
    test = [pair for pair, test in zip(pairs, is_test, strict=True) if test]
    return train, test


def _decode_all(pairs: list[tuple[Path, int]], size: tuple[int, int], mode: str) -> ImageSet:
    channels = len(mode)  # "L" -> 1, "RGB" -> 3
    images = np.empty((len(pairs), channels, size[1], size[0]), dtype=np.uint8)
    for i, (path, _) in enumerate(pairs):
        pixels = np.asarray(_decode(path, size, mode))
        images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    labels = np.array([label for _, label in pairs], dtype=np.int64)
    return ImageSet(images, labels)


def _decode(path: Path, size: tuple[int, int], mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DataError(
                    f"{path}: {im.width}x{im.height} pixels is over the {MAX_PIXELS:,} limit; "
                    f"shrink it or remove it"
                )
            im = ImageOps.exif_transpose(im).convert(mode)
            return im.resize(size, Image.Resampling.BILINEAR)
    except DataError:
        raise
    # Pillow reports damaged files with any of these, depending on the format.
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        struct.error,
        Image.DecompressionBombError,
    ) as e:
        raise DataError(f"{path}: cannot decode this image ({e}); replace or remove it") from e


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")
