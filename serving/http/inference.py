"""KServe V2 / Open Inference Protocol over HTTP: JSON (and the binary tensor extension) in,
the data plane, JSON (and binary) out.

The binary tensor extension: a body is the JSON inference header followed by the tensors'
bytes, `Inference-Header-Content-Length` giving the header's length; an input with
`parameters.binary_data_size` takes that many bytes, in input order. An output asked for
with `parameters.binary_data` (or every output, with the request's
`parameters.binary_data_output`) is answered the same way. tritonclient.http sends and asks
for binary tensors by default.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from serving import v2
from serving.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_TYPE = "application/octet-stream"


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"{what} must be a JSON array")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string")
    return value


def _count(value: Any, what: str) -> int:
    # bool is an int in Python, not in JSON
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{what} must be a whole number >= 0")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensors after it."""
    if header_length is None:
        return body, memoryview(b"")
    if not (header_length.isascii() and header_length.isdigit()):
        raise InvalidInput(f"{HEADER_LENGTH} must be a number of bytes")
    n = int(header_length)
    if n > len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {n}; the body has {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def _typed_values(data: Any, datatype: str) -> np.ndarray | None:
    """JSON `data` (flat or nested, row-major) of the one datatype the model takes; values
    of any other datatype are never read (the core refuses the datatype)."""
    if datatype != v2.INPUT_DATATYPE:
        return None
    try:
        values = np.asarray(_list(data, "an input's data"))
    except ValueError:  # ragged nesting
        raise InvalidInput("an input's data must be a flat or evenly nested array") from None
    if values.size and values.dtype.kind not in "iu":
        raise InvalidInput(f"{v2.INPUT_DATATYPE} data must be whole numbers in 0..255")
    return values.reshape(-1).astype(np.int64, copy=False)


def infer_request(
    doc: Any, binary: memoryview, model: str, version: str
) -> tuple[v2.InferRequest, frozenset[str], float | None]:
    """A V2 JSON inference request -> (the core request, the outputs to answer as binary
    tensors, its deadline as a time.monotonic() value from Triton's `timeout` parameter in
    microseconds)."""
    doc = _object(doc, "the inference request")
    params = _object(doc.get("parameters", {}), "parameters")
    inputs, offset = [], 0
    for i, t in enumerate(_list(doc.get("inputs"), "inputs")):
        t = _object(t, f"inputs[{i}]")
        name = _text(t.get("name"), f"inputs[{i}].name")
        datatype = _text(t.get("datatype"), f"inputs[{i}].datatype")
        shape = tuple(_count(d, f"inputs[{i}].shape") for d in _list(t.get("shape"), "shape"))
        tparams = _object(t.get("parameters", {}), f"inputs[{i}].parameters")
        if "binary_data_size" in tparams:
            size = _count(tparams["binary_data_size"], "binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"inputs[{i}] declares {size} binary bytes; only {len(binary) - offset} follow"
                )
            data: bytes | np.ndarray | None = bytes(binary[offset : offset + size])
            offset += size
        else:
            data = _typed_values(t.get("data"), datatype)
        inputs.append(v2.InferInput(name, datatype, shape, data))
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} binary bytes follow that no input declares")
    binary_default = params.get("binary_data_output") is True
    outputs = []
    for i, o in enumerate(_list(doc.get("outputs", []), "outputs")):
        o = _object(o, f"outputs[{i}]")
        oparams = _object(o.get("parameters", {}), f"outputs[{i}].parameters")
        k = _count(oparams.get("classification", 0), f"outputs[{i}] classification")
        wanted = v2.RequestedOutput(_text(o.get("name"), f"outputs[{i}].name"), k)
        outputs.append((wanted, oparams.get("binary_data", binary_default) is True))
    request_id = doc.get("id", "")
    request = v2.InferRequest(
        model,
        v2.version_number(version),
        request_id if isinstance(request_id, str) else str(request_id),
        inputs,
        [w for w, _ in outputs],
    )
    binary_names = frozenset(w.name for w, b in outputs if b)
    if not outputs and binary_default:
        binary_names = frozenset(v2.OUTPUT_NAMES)
    return request, binary_names, _deadline(params.get("timeout"))


def _deadline(timeout_us: Any) -> float | None:
    if timeout_us is None:
        return None
    return time.monotonic() + _count(timeout_us, "parameters.timeout (microseconds)") / 1e6


def infer_response(
    r: v2.InferResponse, binary_names: frozenset[str]
) -> tuple[bytes, Mapping[str, str]]:
    """The response body and its headers: JSON, or JSON + binary tensors."""
    outputs, chunks = [], []
    for o in r.outputs:
        out: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if o.name in binary_names:
            raw = v2.tensor_bytes(o)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif o.datatype == "BYTES":
            out["data"] = [s.decode() for s in o.data]  # type: ignore[union-attr]
        elif o.datatype == "BOOL":
            out["data"] = np.ascontiguousarray(o.data, dtype=np.bool_).ravel()
        else:  # float32 values written in their shortest exact form
            out["data"] = np.ascontiguousarray(o.data, dtype=np.float32).ravel()
        outputs.append(out)
    doc = {"model_name": r.model, "model_version": str(r.version), "outputs": outputs}
    if r.id:
        doc["id"] = r.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": BINARY_TYPE,
        HEADER_LENGTH: str(len(header)),
    }


def metadata(m: v2.ModelMetadata) -> dict[str, Any]:
    def tensors(ts: tuple[v2.TensorMetadata, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    return {
        "name": m.name,
        "versions": list(m.versions),
        "platform": m.platform,
        "inputs": tensors(m.inputs),
        "outputs": tensors(m.outputs),
    }
