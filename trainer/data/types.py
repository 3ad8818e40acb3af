"""The dataset types every loader returns, and the one exception they raise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(Exception):
    """A dataset problem a user can fix.

    str() is a complete message that names the file (or setting) and says what to do.
    """


# eq=False: numpy arrays have no single truth value, so generated __eq__/__hash__ would be wrong.
@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images with their labels (and, for detection-style data, one box per image).

    images: uint8 (N, C, H, W), C-contiguous. labels: int64 (N,).
    boxes: float32 (N, 4) as x0, y0, x1, y1 in pixels (x1/y1 exclusive), or None.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        images, labels, boxes = self.images, self.labels, self.boxes
        if images.dtype != np.uint8 or images.ndim != 4 or not images.flags.c_contiguous:
            raise ValueError(
                f"images must be C-contiguous uint8 (N, C, H, W), got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.int64 or labels.shape != (len(images),):
            raise ValueError(
                f"labels must be int64 ({len(images)},), got {labels.dtype} {labels.shape}"
            )
        if boxes is not None and (boxes.dtype != np.float32 or boxes.shape != (len(images), 4)):
            raise ValueError(
                f"boxes must be float32 ({len(images)}, 4), got {boxes.dtype} {boxes.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images selected by an integer index array or boolean mask, as a new ImageSet."""
        boxes = None if self.boxes is None else self.boxes[index]
        return ImageSet(np.ascontiguousarray(self.images[index]), self.labels[index], boxes)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named train/test pair whose images share one (C, H, W) shape."""

    name: str
    classes: tuple[str, ...]
    train: ImageSet
    test: ImageSet

    def __post_init__(self) -> None:
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {self.train.images.shape[1:]} and test images "
                f"{self.test.images.shape[1:]} differ in shape"
            )

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def height(self) -> int:
        return self.train.images.shape[2]

    @property
    def width(self) -> int:
        return self.train.images.shape[3]
