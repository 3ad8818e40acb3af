"""The INT8 variant's float plan: which ops stay float, and the rewrites that make the
float/INT8 boundaries cheap are exact. Small CNN graphs are built by hand (no training);
the real exported model is covered by test_export's INT8 tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.export.int8 import REWRITE_TOLERANCE, float_plan, quantize_int8

RNG = np.random.default_rng(0)


def cnn(
    *,
    stem_in: int = 1,
    stem_out: int = 8,
    pool_after_relu: bool = True,
    head: str = "reshape",  # "reshape" | "flatten" | "global"
    trans_b: int = 1,
    size: int = 12,
    classes: int = 5,
) -> onnx.ModelProto:
    """uint8 images -> Cast/Mul/Sub -> Conv 3x3 (stem) -> Relu [-> MaxPool] -> Conv 3x3 ->
    Relu -> MaxPool -> flatten -> Gemm (`logits`) -> Softmax (`probabilities`)."""
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.5, np.float32), "shift"),
        numpy_helper.from_array(
            RNG.normal(0, 0.5, (stem_out, stem_in, 3, 3)).astype(np.float32), "w0"
        ),
        numpy_helper.from_array(RNG.normal(0, 0.1, stem_out).astype(np.float32), "b0"),
        numpy_helper.from_array(RNG.normal(0, 0.2, (16, stem_out, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(RNG.normal(0, 0.1, 16).astype(np.float32), "b1"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "scale"], ["xs"], name="mul"),
        helper.make_node("Sub", ["xs", "shift"], ["xn"], name="sub"),
        helper.make_node("Conv", ["xn", "w0", "b0"], ["c0"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["c0"], ["r0"], name="stem_relu"),
    ]
    side = size
    if pool_after_relu:
        pool = helper.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[2, 2], strides=[2, 2])
        pool.name = "stem_pool"
        nodes.append(pool)
        side //= 2
    nodes += [
        helper.make_node(
            "Conv", [nodes[-1].output[0], "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]
        ),
    ]
    side //= 2
    features = 16 * side * side
    if head == "global":
        nodes.append(helper.make_node("GlobalAveragePool", ["p1"], ["gp"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["gp"], ["flat"], name="flatten", axis=1))
        features = 16
    elif head == "flatten":
        nodes.append(helper.make_node("Flatten", ["p1"], ["flat"], name="flatten", axis=1))
    else:
        inits.append(numpy_helper.from_array(np.array([-1, features], np.int64), "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["p1", "flat_shape"], ["flat"], name="flatten"))
    w = RNG.normal(0, 0.1, (classes, features)).astype(np.float32)
    inits += [
        numpy_helper.from_array(w if trans_b else np.ascontiguousarray(w.T), "wc"),
        numpy_helper.from_array(RNG.normal(0, 0.1, classes).astype(np.float32), "bc"),
    ]
    nodes += [
        helper.make_node(
            "Gemm", ["flat", "wc", "bc"], ["logits"], name="classifier", transB=trans_b
        ),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.UINT8, ["batch", stem_in, size, size]
            )
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model)


def images(model: onnx.ModelProto, n: int = 64) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return RNG.integers(0, 256, (n, *dims), dtype=np.uint8)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"images": x})[0]


def planned(model: onnx.ModelProto):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    plan = float_plan(copy)
    onnx.checker.check_model(copy, full_check=True)
    return copy, plan


@pytest.mark.parametrize(
    "head, trans_b", [("reshape", 1), ("reshape", 0), ("flatten", 1), ("flatten", 0)]
)
def test_rewrites_keep_the_float_logits(head, trans_b):
    model = cnn(head=head, trans_b=trans_b)
    rewritten, plan = planned(model)
    assert len(plan.rewrites) == 2, plan.rewrites
    x = images(model)
    assert np.abs(run(model, x) - run(rewritten, x)).max() <= REWRITE_TOLERANCE


def test_thin_stem_normalisation_classifier_and_softmax_stay_float():
    rewritten, plan = planned(cnn())
    assert set(plan.nodes) == {
        "cast",
        "mul",
        "sub",
        "stem",
        "stem_pool",
        "classifier",
        "flatten",
        "softmax",
    }
    ops = [n.op_type for n in rewritten.graph.node]
    # the pool now comes before the stem's relu, so the INT8 boundary sits after the pool
    assert ops.index("MaxPool") < ops.index("Relu")
    assert "stem stem: 9 products per output value" in plan.reasons


def test_unnamed_nodes_get_names_so_exclusion_by_name_cannot_match_them_all():
    model = cnn()
    for node in model.graph.node:
        node.name = ""
    rewritten, plan = planned(model)
    names = [n.name for n in rewritten.graph.node]
    assert "" not in plan.nodes and all(names) and len(set(names)) == len(names)
    assert len(plan.nodes) < len(names)


def test_a_thick_first_convolution_is_quantised():
    rewritten, plan = planned(cnn(stem_in=8))  # 8 x 3 x 3 = 72 products per output
    assert "stem" not in plan.nodes and not any("stem" in r for r in plan.rewrites)
    assert [n.op_type for n in rewritten.graph.node][3:6] == ["Conv", "Relu", "MaxPool"]


def test_a_stem_without_a_pool_and_a_global_pool_head_are_left_as_they_are():
    model = cnn(pool_after_relu=False, head="global")
    rewritten, plan = planned(model)
    assert plan.rewrites == []
    assert [n.op_type for n in rewritten.graph.node] == [n.op_type for n in model.graph.node]
    assert {"stem", "classifier", "softmax"} <= set(plan.nodes)


def test_int8_graph_computes_stem_and_logits_in_float(tmp_path: Path):
    model = cnn(size=16)
    src, dst = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    onnx.save(model, src)
    entry = quantize_int8(src, dst, images(model, 256), seed=0)["quantization"]
    assert entry["rewrite_max_abs_diff_logit"] <= REWRITE_TOLERANCE
    q = onnx.load(dst)
    producer = {o: n for n in q.graph.node for o in n.output}
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    # the stem reads a float weight initializer; the second conv a dequantised int8 weight
    assert producer.get(convs[0].input[1]) is None
    assert producer[convs[1].input[1]].op_type == "DequantizeLinear"
    assert producer["logits"].op_type == "Gemm"
    assert producer.get(producer["logits"].input[1]) is None  # float classifier weight
    x = images(model, 128)
    float_top = run(model, x).argmax(1)
    int8_top = run(q, x).argmax(1)
    assert (float_top == int8_top).mean() >= 0.9
