"""A deliberately slow model with the same answers: a served model plus a chain of MatMul+Tanh
layers that only burns time. The chain's result is multiplied by zero and added to the logits,
so ONNX Runtime cannot prune it and the answers stay the original model's. Used where the
queue, not the RPC layer, must be the bottleneck (`make overload --model slow`, tests).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from serving.contract import LOGITS, MANIFEST_FILE, MODEL_FILE, VARIANT_FILES

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "runs/bench-export/models/fashion-mnist/1"
NAME = "fashion-mnist"  # the source's: its ONNX metadata names it
SHAPE = (1, 28, 28)


def slow_down(model: onnx.ModelProto, layers: int = 200, width: int = 1024) -> onnx.ModelProto:
    """`model` (input x, a node producing LOGITS, then Softmax) with the busy chain added
    between its logits and its Softmax. Compute per row grows with `layers`; one shared
    weight keeps the file small (~4 MiB at width 1024)."""
    g = model.graph
    x = g.input[0].name
    producer = next(n for n in g.node if LOGITS in n.output)
    # Its readers (the Softmax, the graph output) now get LOGITS from the Add below.
    producer.output[list(producer.output).index(LOGITS)] = "logits_fast"
    features = int(np.prod([d.dim_value for d in g.input[0].type.tensor_type.shape.dim[1:]]))
    rng = np.random.default_rng(0)
    g.initializer.extend(
        [
            numpy_helper.from_array(
                (rng.standard_normal((features, width)) / features).astype(np.float32), "busy_in"
            ),
            numpy_helper.from_array(
                (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                "busy_w",
            ),
            numpy_helper.from_array(np.zeros(1, np.float32), "busy_zero"),
        ]
    )
    nodes = [
        helper.make_node("Cast", [x], ["busy_x"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Flatten", ["busy_x"], ["busy_flat"], axis=1),
        helper.make_node("MatMul", ["busy_flat", "busy_in"], ["busy_h0"]),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"busy_h{i}", "busy_w"], [f"busy_m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"busy_m{i}"], [f"busy_h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"busy_h{layers}"], ["busy"], keepdims=1),
        helper.make_node("Mul", ["busy", "busy_zero"], ["busy_nothing"]),
        helper.make_node("Add", ["logits_fast", "busy_nothing"], [LOGITS]),
    ]
    at = list(g.node).index(producer) + 1
    for k, node in enumerate(nodes):
        g.node.insert(at + k, node)
    onnx.checker.check_model(model)
    return model


def repository(root: Path, source: Path = SOURCE, layers: int = 200) -> Path:
    """A repository at `root` serving the slowed-down copy of `source` (a version folder of
    `make bench-export`) as model NAME, version 1; made once."""
    folder = root / NAME / "1"
    if (folder / MANIFEST_FILE).is_file():
        return root
    if not (source / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{source / MODEL_FILE}: run `make bench-export` first")
    data = slow_down(onnx.load(source / MODEL_FILE), layers).SerializeToString()
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    manifest.update(variants={}, rejected_variants={})
    files = {MODEL_FILE: hashlib.sha256(data).hexdigest()}
    for name, digest in manifest["files"].items():  # the insight model, as exported
        if name != MODEL_FILE and name not in VARIANT_FILES.values():
            files[name] = digest
    manifest["files"] = files
    tmp = root / NAME / ".tmp-1"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / MODEL_FILE).write_bytes(data)
    for name in files:
        if name != MODEL_FILE:
            shutil.copyfile(source / name, tmp / name)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    tmp.rename(folder)
    return root
