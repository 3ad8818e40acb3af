"""Decoding a request's images into one uint8 batch of the model's input: on the event loop
when that is cheap (few encoded bytes declaring few pixels), else on the decode executor,
so one big or hostile image never stalls every other call of the worker."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence

import numpy as np

from serving.codec import NeedsThread, PixelBudget, decode_image, tensor_to_image
from serving.contract import InputSpec
from serving.errors import InvalidInput
from serving.images import EncodedImage, ImageInput, RawTensor

# Decoding this many encoded bytes inline would stall the event loop; hand it to a thread.
INLINE_DECODE_BYTES = 256 * 1024
# So would decoding an image that declares this many pixels, however small its file: a 62 KB
# RGBA PNG can declare 16 M pixels and take most of a second to decode.
INLINE_DECODE_PIXELS = 512 * 512


class Decoder:
    """Decodes on the calling thread, or on `executor` (None: always inline)."""

    def __init__(self, executor: concurrent.futures.Executor | None = None):
        self.executor = executor

    def decode(
        self, images: Sequence[ImageInput], spec: InputSpec, inline_pixels: int | None = None
    ) -> np.ndarray:
        """Every image of a request -> one (N, C, H, W) uint8 array, or InvalidInput naming
        the image (or NeedsThread for an image declaring more than `inline_pixels`)."""
        out = np.empty((len(images), *spec.shape), dtype=np.uint8)
        budget = PixelBudget(spec)
        for i, img in enumerate(images):
            try:
                if isinstance(img, RawTensor):
                    out[i] = tensor_to_image(img.dtype, img.shape, img.data, spec)
                elif isinstance(img, EncodedImage):
                    out[i] = decode_image(img.data, spec, inline_pixels, budget)
                else:
                    raise InvalidInput("neither encoded bytes nor a tensor")
            except InvalidInput as exc:
                raise InvalidInput(f"image {i}: {exc}") from None
        return out

    def inline(self, images: Sequence[ImageInput], spec: InputSpec) -> np.ndarray | None:
        """`decode` on the calling thread (the event loop) when that is cheap. None: the
        decode belongs on the executor."""
        if self.executor is None:
            return self.decode(images, spec)
        encoded = sum(len(i.data) for i in images if isinstance(i, EncodedImage))
        if encoded >= INLINE_DECODE_BYTES:
            return None
        try:
            return self.decode(images, spec, INLINE_DECODE_PIXELS)
        except NeedsThread:
            return None

    async def in_thread(self, images: Sequence[ImageInput], spec: InputSpec) -> np.ndarray:
        """`decode` on the executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.decode, images, spec)
