"""INT8 static quantisation of an exported graph: which ops stay float, and why.

The variant is QDQ, per-channel, calibrated on training images (onnxruntime.quantization).
Quantising every op is not the fastest graph on a CPU. Measured with ORT's profiler on the
default Fashion-MNIST model at batch 32 (2-core AVX2, no VNNI; BENCHMARKS.md has the runs):

- The stem convolution reads one channel: 1 x 3 x 3 = 9 products per output value. ORT's
  integer convolution spends its time packing and requantising there and took 1,103 us
  against 207 us for the float NCHWc kernel, so a convolution with fewer than
  STEM_MIN_PRODUCTS products per output, and the normalisation before it, stay float.
  The deeper convolutions (144-576 products) run 1.4-1.9x faster in INT8.
- The classifier (the Gemm that writes `logits`) stays float: it is 1% of the time, and
  the probabilities are then not computed from 8-bit logits. Softmax stays float too:
  quantised, every probability would be a multiple of 1/255.

Two exact rewrites of the float graph make the float/INT8 boundaries cheap:

- Stem Conv -> Relu -> MaxPool becomes Conv -> MaxPool -> Relu (max and relu commute).
  ORT's QDQPropagationTransformer moves a QuantizeLinear up through MaxPool but not
  through Relu; with the boundary after the pool, the pool would run on uint8 NCHW data in
  ORT's generic kernel (984 us instead of 100 us in float).
- The flatten before the classifier reads the (C, H, W) feature map in (H, W, C) order,
  and the Gemm's weight columns are permuted to match. ORT runs quantised convolutions in
  NHWC and otherwise transposes back to NCHW just to flatten (160 us for 36 KB).

Each rewrite is checked: the rewritten float graph must give the same logits as the one
it came from, or the variant is not built.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from serving.contract import INPUT_NAME, LOGITS

log = logging.getLogger("convserve.export")

CALIBRATION_IMAGES = 512
STEM_MIN_PRODUCTS = 64  # a convolution with fewer products per output value stays float
REWRITE_TOLERANCE = 1e-4  # max |delta logit| a rewrite of the float graph may cause


class CalibrationReader(CalibrationDataReader):
    """Feeds calibration batches of raw uint8 images, exactly what the graph takes."""

    def __init__(self, images: np.ndarray, batch: int = 64):
        self._batches = iter([images[i : i + batch] for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_images(images: np.ndarray, seed: int) -> np.ndarray:
    """A seeded random sample of CALIBRATION_IMAGES training images (uint8, NCHW)."""
    n = min(CALIBRATION_IMAGES, len(images))
    pick = np.random.default_rng(seed).choice(len(images), n, replace=False)
    return np.ascontiguousarray(images[np.sort(pick)])


@dataclass
class FloatPlan:
    """The nodes that stay float, why, and the rewrites made to the float graph for them."""

    nodes: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)


class _Graph:
    """Producer/consumer lookups over an ONNX graph (rebuilt after each rewrite)."""

    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in self.g.initializer}
        self.outputs = {o.name for o in self.g.output}
        self.shapes = {
            v.name: [
                d.dim_value if d.HasField("dim_value") else None
                for d in v.type.tensor_type.shape.dim
            ]
            for v in [*self.g.value_info, *self.g.output]
        }

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def ancestors(self, tensor: str) -> list[onnx.NodeProto]:
        """Every node `tensor` depends on."""
        seen: dict[str, onnx.NodeProto] = {}
        todo = [tensor]
        while todo:
            node = self.producer.get(todo.pop())
            if node is not None and node.name not in seen:
                seen[node.name] = node
                todo.extend(node.input)
        return list(seen.values())


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _float_stem(model: onnx.ModelProto, plan: FloatPlan) -> None:
    """Keep a thin first convolution (and everything before it) float."""
    g = _Graph(model)
    conv = next((n for n in g.g.node if n.op_type == "Conv"), None)
    if conv is None or conv.input[1] not in g.inits:
        return
    weight = g.inits[conv.input[1]].dims  # (out, in / group, kh, kw)
    products = int(np.prod(weight[1:]))
    if products >= STEM_MIN_PRODUCTS:
        return
    plan.nodes += [n.name for n in g.ancestors(conv.input[0])] + [conv.name]
    plan.reasons.append(f"stem {conv.name}: {products} products per output value")
    relu = g.only_consumer(conv.output[0])
    pool = relu is not None and relu.op_type == "Relu" and g.only_consumer(relu.output[0])
    if pool and pool.op_type == "MaxPool" and len(pool.output) == 1:  # no Indices output
        # Conv -> Relu(a) -> MaxPool(b)  ==>  Conv -> MaxPool(a) -> Relu(b)
        pooled, out = relu.output[0], pool.output[0]
        pool.input[0], pool.output[0] = conv.output[0], pooled
        relu.input[0], relu.output[0] = pooled, out
        nodes = list(g.g.node)
        i, j = nodes.index(relu), nodes.index(pool)
        nodes[i], nodes[j] = nodes[j], nodes[i]
        g.g.ClearField("node")
        g.g.node.extend(nodes)
        plan.nodes.append(pool.name)
        plan.rewrites.append(f"stem {conv.name}: Relu moved after MaxPool")


def _float_classifier(model: onnx.ModelProto, plan: FloatPlan) -> None:
    """Keep the logits Gemm float; flatten its input in NHWC order if it is a feature map."""
    g = _Graph(model)
    gemm = g.producer.get(LOGITS)
    if gemm is None or gemm.op_type != "Gemm":
        return
    plan.nodes.append(gemm.name)
    plan.reasons.append(f"classifier {gemm.name}: float logits")
    flat = g.producer.get(gemm.input[0])
    if flat is None or flat.op_type not in ("Reshape", "Flatten") or _attr(gemm, "transA", 0):
        return
    shape = g.shapes.get(flat.input[0], [])
    weight = g.inits.get(gemm.input[1])
    if (
        len(shape) != 4
        or None in shape[1:]
        or shape[2] * shape[3] == 1
        or weight is None
        or len(g.consumers[weight.name]) != 1
        or g.only_consumer(flat.output[0]) is not gemm
        or (flat.op_type == "Flatten" and _attr(flat, "axis", 1) != 1)
        or (flat.op_type == "Reshape" and not _flattens_per_sample(g, flat, shape))
    ):
        return
    c, h, w = shape[1:]
    trans_b = _attr(gemm, "transB", 0)
    wt = numpy_helper.to_array(weight)
    cols = wt if trans_b else wt.T  # (classes, C*H*W)
    cols = cols.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(len(cols), -1)
    weight.CopyFrom(
        numpy_helper.from_array(np.ascontiguousarray(cols if trans_b else cols.T), weight.name)
    )
    nhwc = flat.input[0] + "_nhwc"
    transpose = helper.make_node(
        "Transpose", [flat.input[0]], [nhwc], name=flat.name + "_nhwc", perm=[0, 2, 3, 1]
    )
    flat.input[0] = nhwc
    nodes = list(g.g.node)
    nodes.insert(nodes.index(flat), transpose)
    g.g.ClearField("node")
    g.g.node.extend(nodes)
    plan.nodes.append(flat.name)
    plan.rewrites.append(f"classifier {gemm.name}: flattens (H, W, C), weight columns permuted")


def _flattens_per_sample(g: _Graph, reshape: onnx.NodeProto, shape: list[int | None]) -> bool:
    target = g.inits.get(reshape.input[1])
    if target is None:
        return False
    dims = numpy_helper.to_array(target).tolist()
    per_sample = shape[1] * shape[2] * shape[3]
    return len(dims) == 2 and dims[1] in (per_sample, -1) and dims[0] in (-1, 0)


def float_plan(model: onnx.ModelProto) -> FloatPlan:
    """Rewrite `model` in place for a mixed-precision QDQ graph; say what stays float."""
    for i, node in enumerate(model.graph.node):  # exclusion is by name: "" would match all
        if not node.name:
            node.name = f"{node.op_type}_{i}_unnamed"
    plan = FloatPlan()
    _float_stem(model, plan)
    _float_classifier(model, plan)
    plan.nodes += [n.name for n in model.graph.node if n.op_type == "Softmax"]
    del model.graph.value_info[:]  # renamed tensors: infer the shapes again
    return plan


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([LOGITS], {INPUT_NAME: images})[0]


def _check_rewrite(before: Path, after: Path, images: np.ndarray) -> float:
    diff = float(np.abs(_logits(before, images) - _logits(after, images)).max())
    if not diff <= REWRITE_TOLERANCE:
        raise ValueError(f"the graph rewrites for INT8 changed the logits by {diff:.3g}")
    return diff


def quantize_int8(src: Path, dst: Path, train_images: np.ndarray, seed: int) -> dict[str, Any]:
    """Static INT8 (QDQ, per-channel 7-bit weights) of `src` into `dst`; the manifest entry.

    reduce_range keeps weights in 7 bits: on x86 without VNNI, ORT's u8s8 kernels saturate
    their int16 intermediates with full-range weights (measured: the default Fashion-MNIST
    model lost 1.2 points with them, none without).
    """
    images = calibration_images(train_images, seed)
    with tempfile.TemporaryDirectory(prefix="convserve-int8-") as tmp:
        pre, planned = Path(tmp) / "pre.onnx", Path(tmp) / "planned.onnx"
        try:  # shape inference + graph optimisation (BN folding etc.) make better QDQ graphs
            quant_pre_process(str(src), str(pre))
            source, preprocessed = pre, True
        except Exception as exc:  # optional step: quantising the plain graph still works
            log.warning("quant_pre_process failed (%s); quantising the exported graph", exc)
            source, preprocessed = src, False
        model = onnx.shape_inference.infer_shapes(onnx.load(source))
        plan = float_plan(model)
        onnx.save(onnx.shape_inference.infer_shapes(model), planned)
        rewrite_diff = _check_rewrite(source, planned, images)
        quantize_static(
            str(planned),
            str(dst),
            CalibrationReader(images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=plan.nodes,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        "quantization": {
            "format": "QDQ",
            "per_channel": True,
            "reduce_range": True,
            "activations": "uint8",
            "weights": "int8",
            "calibration": {"method": "MinMax", "images": len(images), "split": "train"},
            "preprocessed": preprocessed,
            "float_nodes": plan.nodes,
            "float_ops": sorted(_op_types(model, plan.nodes)),
            "float_reasons": plan.reasons,
            "rewrites": plan.rewrites,
            "rewrite_max_abs_diff_logit": rewrite_diff,
        }
    }


def _op_types(model: onnx.ModelProto, names: Iterable[str]) -> set[str]:
    wanted = set(names)
    return {n.op_type for n in model.graph.node if n.name in wanted}
