"""MNIST and Fashion-MNIST: four IDX files each, fetched and read the same way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.fetch import RemoteFile, locate
from trainer.data.idx import read_idx
from trainer.data.types import DataError, Dataset, ImageSet


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX dataset lives and what it holds.

    files: train images, train labels, test images, test labels (in that order).
    system_dirs: folders a system package installs the files into, searched before downloading.
    """

    name: str
    classes: tuple[str, ...]
    files: tuple[RemoteFile, RemoteFile, RemoteFile, RemoteFile]
    system_dirs: tuple[Path, ...] = ()


def _fashion(filename: str, official: str, debian: str) -> RemoteFile:
    # Debian's dataset-fashion-mnist package recompresses the files: the IDX content is the
    # same but the gzip bytes differ, so its copies have their own digests.
    url = f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{filename}"
    return RemoteFile(filename, (official, debian), (url,))


def _mnist(filename: str, digest: str) -> RemoteFile:
    return RemoteFile(
        filename,
        (digest,),
        (
            f"https://ossci-datasets.s3.amazonaws.com/mnist/{filename}",
            f"https://storage.googleapis.com/cvdf-datasets/mnist/{filename}",
        ),
    )


FASHION_MNIST = IdxSource(
    name="fashion-mnist",
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    files=(
        _fashion(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
        ),
        _fashion(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        ),
        _fashion(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
        ),
        _fashion(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        ),
    ),
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
)

# MNIST uses the same filenames as Fashion-MNIST, so it must never search Fashion-MNIST's
# system folder: it has none.
MNIST = IdxSource(
    name="mnist",
    classes=tuple(str(d) for d in range(10)),
    files=(
        _mnist(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        _mnist(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        _mnist(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        _mnist(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    ),
)


def load_idx(
    source: IdxSource, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Dataset:
    """Locate (or download), verify and read an IDX dataset; images come back (N, 1, H, W)."""
    paths = locate(
        source.files,
        dataset=source.name,
        data_dir=data_dir,
        system_dirs=source.system_dirs,
        download=download,
    )
    train_images, train_labels, test_images, test_labels = (paths[f.filename] for f in source.files)
    return Dataset(
        name=source.name,
        classes=source.classes,
        train=_image_set(train_images, train_labels, len(source.classes)),
        test=_image_set(test_images, test_labels, len(source.classes)),
    )


def _image_set(images_path: Path, labels_path: Path, n_classes: int) -> ImageSet:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected (N, H, W) images, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected (N,) labels, got shape {labels.shape}")
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path} holds {len(labels)} labels but {images_path} holds {len(images)} "
            f"images; one of them is from another dataset or damaged, replace both"
        )
    if len(labels) and labels.max() >= n_classes:
        raise DataError(
            f"{labels_path}: label {labels.max()} is out of range for {n_classes} classes; "
            f"the file is from another dataset or damaged, replace it"
        )
    return ImageSet(images[:, None], labels.astype(np.int64))
