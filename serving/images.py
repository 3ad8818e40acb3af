"""A request's images as the core takes them: encoded files or raw tensors, whatever the
wire; and raw uint8 tensors of the model's input size stacked into one batch in one copy
(the bulk clients' path)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.contract import InputSpec


# One image of a request. Slotted: a 32-image request makes 32 of them (350 against 550 ns
# each as a NamedTuple).
@dataclass(slots=True)
class EncodedImage:
    data: bytes  # PNG, JPEG, WebP, BMP or GIF


@dataclass(slots=True)
class RawTensor:
    dtype: str  # "uint8" | "float32" (anything else is refused, naming it)
    shape: Sequence[int]  # (C, H, W), or (H, W) for one channel
    data: bytes  # little-endian


# None: an image that is neither (refused, naming the image).
ImageInput = EncodedImage | RawTensor | None


def stack_uint8(images: Sequence[ImageInput], spec: InputSpec) -> np.ndarray | None:
    """Raw uint8 tensors of exactly the model's input size (what bulk clients send) -> one
    (N, C, H, W) array in one copy, rather than one validation and copy per image (about 6x
    faster at 32 images). None when any image is something else: `decode` then takes them
    one by one and says which is wrong and why."""
    shapes: list[Sequence[int]] = [spec.shape, list(spec.shape)]  # a converter's list or tuple
    if spec.channels == 1:
        shapes += [(spec.height, spec.width), [spec.height, spec.width]]
    size = spec.nbytes
    payloads = []
    for img in images:
        if (
            type(img) is not RawTensor
            or img.dtype != "uint8"
            or len(img.data) != size
            or img.shape not in shapes
        ):
            return None
        payloads.append(img.data)
    out = np.empty((len(payloads), *spec.shape), dtype=np.uint8)
    out.reshape(-1)[:] = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    return out
