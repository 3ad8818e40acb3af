"""The KServe V2 / Open Inference Protocol in core types: what every V2 front end (gRPC now,
HTTP next) converts its wire format to and from.

A V2 request names a model and an optional version (a string of ASCII digits), carries one
input tensor `images` (the model's datatype, UINT8, NCHW; anything else is refused, as the
protocol asks) as raw little-endian bytes or as typed values,
and may ask for `logits` and/or `probabilities`, each optionally through the classification
extension (the top k classes as "<value>:<index>:<label>" strings, best first). The server's
own outputs, answered only when named: `ood_score` (FP32 (N, 1), serving.monitor's
out-of-distribution score) and `ood_flagged` (BOOL (N, 1), the score above the version's
threshold).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from serving import __version__
from serving.contract import INPUT_NAME, OUTPUT_NAMES, InputSpec
from serving.errors import InvalidInput, ModelNotFound
from serving.shm import SharedMemory, SharedSlice

SERVER_NAME = "convserve"
SERVER_VERSION = __version__
# Triton's names for the extensions served (binary_tensor_data: over HTTP).
EXTENSIONS = (
    "classification",
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
    "system_shared_memory",
    "logging",
)
PLATFORM = "onnxruntime_onnx"
INPUT_DATATYPE = "UINT8"  # the model's input, as model_metadata says
# Outputs the server computes beside the graph's (serving.monitor), answered when named; a
# request naming no output gets the graph's, as Triton would answer.
OOD_SCORE, OOD_FLAGGED = SERVER_OUTPUTS = ("ood_score", "ood_flagged")


@dataclass(frozen=True)
class InferInput:
    """One input tensor: `data` is raw little-endian bytes, the typed values as an array, a
    slice of a registered shared-memory region (None when the request carried neither for a
    datatype we do not take)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | np.ndarray | SharedSlice | None


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0  # > 0: the classification extension's top k
    shared: SharedSlice | None = None  # write it into this shared memory, not the answer


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: int | None
    id: str
    inputs: Sequence[InferInput]
    outputs: Sequence[RequestedOutput]  # empty: every output, as tensors
    # Tensor bytes sent beside the inputs, one per input in order (gRPC raw_input_contents,
    # HTTP's binary tensor extension); empty when each input carries its own data.
    raw: Sequence[bytes] = ()


@dataclass(frozen=True)
class InferOutput:
    """FP32 values (N, K), or BYTES classification strings (N * k of them, row-major)."""

    name: str
    datatype: str  # "FP32" | "BYTES" | "BOOL"
    shape: tuple[int, int]
    data: np.ndarray | list[bytes]
    shared: SharedSlice | None = None  # written there: the answer carries no data for it


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: int
    id: str
    outputs: list[InferOutput]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size (the batch)


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


def version_number(text: str) -> int | None:
    """A V2 model version (a string) as the repository's number; "" is the latest."""
    if not text:
        return None
    # ASCII digits only: str.isdigit() admits "²" and "١", and int() refuses > 4300 digits.
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise ModelNotFound(f"model version {clip(text)!r} is not a version number")
    return int(text)


def clip(text: str, limit: int = 64) -> str:
    """A client's string, short enough to quote back in an error message."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def model_metadata(
    name: str, versions: Sequence[int], spec: InputSpec, num_classes: int
) -> ModelMetadata:
    return ModelMetadata(
        name=name,
        versions=tuple(str(v) for v in versions),
        platform=PLATFORM,
        inputs=(TensorMetadata(INPUT_NAME, INPUT_DATATYPE, (-1, *spec.shape)),),
        outputs=(
            *(TensorMetadata(n, "FP32", (-1, num_classes)) for n in OUTPUT_NAMES),
            TensorMetadata(OOD_SCORE, "FP32", (-1, 1)),
            TensorMetadata(OOD_FLAGGED, "BOOL", (-1, 1)),
        ),
    )


def input_rows(request: InferRequest, spec: InputSpec, max_images: int) -> np.ndarray:
    """A request's one input tensor -> validated (N, C, H, W) uint8 rows for `spec`."""
    if len(request.inputs) != 1:
        n = len(request.inputs)
        raise InvalidInput(f"expected exactly one input tensor 'images', got {n}")
    t = request.inputs[0]
    if t.name != INPUT_NAME:
        raise InvalidInput(f"unknown input {clip(t.name)!r}; the model takes 'images'")
    if request.raw and len(request.raw) != 1:
        raise InvalidInput("raw_input_contents must hold exactly one tensor")
    data = request.raw[0] if request.raw else _raw_bytes(t)
    shape = tuple(int(d) for d in t.shape)
    if len(shape) != 4 or shape[1:] != spec.shape:
        shown = list(shape) if len(shape) <= 8 else f"{len(shape)} dimensions"
        raise InvalidInput(
            f"input 'images' must have shape [N, {', '.join(map(str, spec.shape))}], got {shown}"
        )
    n = shape[0]
    if n < 1:
        raise InvalidInput(f"input 'images' has batch size {n}")
    if n > max_images:
        raise InvalidInput(f"request has {n} images; the limit is {max_images}")
    if t.datatype != INPUT_DATATYPE:
        dims = ", ".join(map(str, (-1, *spec.shape)))
        raise InvalidInput(
            f"input 'images' must be {INPUT_DATATYPE} with shape [{dims}] (the model's "
            f"metadata), got {clip(t.datatype)}"
        )
    expected = n * spec.nbytes
    if len(data) != expected:
        raise InvalidInput(
            f"input 'images' holds {len(data)} bytes; shape {list(shape)} of {t.datatype} "
            f"needs {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def read_shared(request: InferRequest, shm: SharedMemory) -> InferRequest:
    """The request with every input named by a shared-memory slice read from its region."""
    if not any(isinstance(t.data, SharedSlice) for t in request.inputs):
        return request
    if request.raw:
        raise InvalidInput("an input in shared memory cannot come with raw_input_contents")
    inputs = [
        replace(t, data=shm.read(t.data)) if isinstance(t.data, SharedSlice) else t
        for t in request.inputs
    ]
    return replace(request, inputs=inputs)


def write_shared(outputs: list[InferOutput], shm: SharedMemory) -> None:
    """Write each output asked for in shared memory into its region."""
    for o in outputs:
        if o.shared is not None:
            shm.write(o.shared, tensor_bytes(o))


def tensor_bytes(o: InferOutput) -> bytes:
    """An output's raw little-endian bytes; BYTES as KServe/Triton encode them, each element
    a 4-byte little-endian length then its bytes."""
    if o.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(s)) + s for s in o.data)  # type: ignore[union-attr]
    if o.datatype == "BOOL":
        return np.ascontiguousarray(o.data, np.bool_).tobytes()
    return np.ascontiguousarray(o.data, "<f4").tobytes()


def _raw_bytes(t: InferInput) -> bytes:
    """The tensor's bytes. Typed values of another datatype are never read: input_rows
    refuses that datatype before it looks at the bytes."""
    if t.data is None or t.datatype != INPUT_DATATYPE:
        return b""
    if isinstance(t.data, bytes):
        return t.data
    values = np.asarray(t.data, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInput("UINT8 contents must lie in 0..255")
    return values.astype(np.uint8).tobytes()


def requested_outputs(outputs: Sequence[RequestedOutput]) -> list[RequestedOutput]:
    """The outputs to answer, each checked; every output when none is named."""
    wanted = list(outputs) or [RequestedOutput(n) for n in OUTPUT_NAMES]
    for i, o in enumerate(wanted):
        if o.name not in OUTPUT_NAMES + SERVER_OUTPUTS:
            have = [*OUTPUT_NAMES, *SERVER_OUTPUTS]
            raise InvalidInput(f"unknown output {clip(o.name)!r}; have {have}")
        # Each at most once: 30,000 copies in a 1 MB request cost seconds of event loop.
        if any(o.name == other.name for other in wanted[:i]):
            raise InvalidInput(f"output {o.name!r} is requested more than once")
        if o.classification < 0:
            raise InvalidInput(f"output {o.name!r}: classification must be >= 0")
        if o.classification and o.name in SERVER_OUTPUTS:
            raise InvalidInput(f"output {o.name!r} has no classes to rank")
    return wanted


def outputs(
    out: np.ndarray,
    wanted: Sequence[RequestedOutput],
    labels: Sequence[str],
    ood_scores: np.ndarray,
    ood_flagged: np.ndarray,
) -> list[InferOutput]:
    """The batcher's (N, 2, K) logits and probabilities, and the (N,) out-of-distribution
    scores and flags, as the requested output tensors."""
    n, k = len(out), len(labels)
    answers = []
    for o in wanted:
        if o.name == OOD_SCORE:
            answers.append(InferOutput(o.name, "FP32", (n, 1), ood_scores[:, None], o.shared))
            continue
        if o.name == OOD_FLAGGED:
            answers.append(InferOutput(o.name, "BOOL", (n, 1), ood_flagged[:, None], o.shared))
            continue
        values = out[:, OUTPUT_NAMES.index(o.name)]
        if o.classification:
            kk = min(o.classification, k)
            order = np.argsort(-values, axis=1, kind="stable")[:, :kk]
            strings = [
                f"{values[r, c]:f}:{c}:{labels[c]}".encode() for r in range(n) for c in order[r]
            ]
            answers.append(InferOutput(o.name, "BYTES", (n, kk), strings, o.shared))
        else:
            answers.append(InferOutput(o.name, "FP32", (n, k), values, o.shared))
    return answers
