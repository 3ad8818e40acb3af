"""The gRPC server, end to end on loopback with real clients and real ONNX Runtime.

Behaviour is tested against servers built in this process (tests/inprocess.py: port 0, a
registry of their own); `cnn-serve` processes only for what a process shows: SIGTERM and
drain, start-up failures, `--workers N`, the event loop and what is imported.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from serving.client import Client, PredictionError
from serving.probe import check
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from serving.proto.inference import grpc_predict_v2_pb2 as v2
from serving.proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from tests.inprocess import serving
from tests.serving_helpers import (
    ROOT,
    TRITON_SCRIPT,
    metric_value,
    running_server,
    start_server,
    wait_for,
)
from trainer.data import load_dataset

MODEL = "fashion-mnist"


@pytest.fixture(scope="module")
def fashion_test():
    return load_dataset("fashion-mnist").test


@pytest.fixture(scope="module")
def version_dir(model_repository) -> Path:
    return model_repository / MODEL / "1"


@pytest.fixture(scope="module")
def ort_probs(version_dir, fashion_test):
    """Probabilities of the first 1000 test images from ONNX Runtime in-process."""
    sess = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"images": fashion_test.images[:1000]})[0]


@pytest.fixture(scope="module")
def server(model_repository):
    with serving(
        model_repository,
        max_queue_delay_us=2000,
        max_batch_size=32,
        max_message_bytes=2_000_000,
        max_images_per_request=300,
    ) as s:
        yield s


def png(image_chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_chw[0]).save(buf, format="PNG")
    return buf.getvalue()


def probabilities(prediction: pb.Prediction) -> np.ndarray:
    """The ten class probabilities of one prediction (asked for with top_k=10)."""
    got = np.zeros(10)
    for c in prediction.classes:
        got[c.index] = c.probability
    return got


def tensor(image_chw: np.ndarray, dtype=pb.UINT8, **kw) -> pb.Image:
    return pb.Image(
        tensor=pb.Tensor(
            dtype=dtype,
            shape=kw.get("shape", list(image_chw.shape)),
            data=kw.get("data", image_chw.tobytes()),
        )
    )


# ----------------------------------------------------------------------------- Predict
def test_predict_with_png_bytes_matches_onnx_runtime_and_the_model_accuracy(
    server, fashion_test, ort_probs, version_dir
):
    n = 500
    with Client(server.target) as client:
        preds = []
        for start in range(0, n, 100):
            preds += client.predict([png(x) for x in fashion_test.images[start : start + 100]], 3)
    got = np.array([p.index for p in preds])
    assert np.array_equal(got, ort_probs[:n].argmax(1))  # the same answers as ORT in-process
    accuracy = float((got == fashion_test.labels[:n]).mean())
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert accuracy == pytest.approx(manifest["test_accuracy"], abs=0.05)
    top = preds[0].classes
    assert len(top) == 3 and top[0].probability >= top[1].probability >= top[2].probability
    assert abs(top[0].probability - float(ort_probs[0].max())) < 1e-5
    assert preds[0].model == MODEL and preds[0].version == 1


def test_raw_uint8_and_float32_tensors_give_the_same_answer(server, fashion_test, ort_probs):
    x = fashion_test.images[:4]
    stub = pb_grpc.ClassifierStub(server.channel())
    as_u8 = stub.Predict(pb.PredictRequest(images=[tensor(i) for i in x], top_k=10))
    as_f32 = stub.Predict(
        pb.PredictRequest(images=[tensor(i.astype(np.float32), pb.FLOAT32) for i in x], top_k=10)
    )
    hw = stub.Predict(pb.PredictRequest(images=[tensor(i, shape=[28, 28]) for i in x], top_k=10))
    for resp in (as_u8, as_f32, hw):
        for row, p in zip(ort_probs[:4], resp.predictions, strict=True):
            np.testing.assert_allclose(probabilities(p), row, atol=1e-6)


def test_a_request_mixing_tensors_and_files_gets_each_images_own_answer(
    server, fashion_test, ort_probs
):
    """All-uint8 requests take a one-copy path; one that mixes kinds takes the general one.
    Both give each image its own row, and an error names the image it is about."""
    x = fashion_test.images[:5]
    mixed = [
        tensor(x[0]),
        pb.Image(encoded=png(x[1])),
        tensor(x[2], shape=[28, 28]),
        tensor(x[3].astype(np.float32), pb.FLOAT32),
        tensor(x[4]),
    ]
    stub = pb_grpc.ClassifierStub(server.channel())
    uniform = [tensor(i, shape=[28, 28]) if n % 2 else tensor(i) for n, i in enumerate(x)]
    for images in (mixed, uniform):
        resp = stub.Predict(pb.PredictRequest(images=images, top_k=10), timeout=30)
        for row, p in zip(ort_probs[:5], resp.predictions, strict=True):
            np.testing.assert_allclose(probabilities(p), row, atol=1e-6)
    short = [tensor(i) for i in x]
    short[3] = tensor(x[3], data=x[3].tobytes()[:-1])
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictRequest(images=short), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("image 3: tensor data is 783 bytes")


def test_predict_stream_answers_each_request_in_order(server, fashion_test, ort_probs):
    stub = pb_grpc.ClassifierStub(server.channel())
    reqs = [
        pb.PredictRequest(images=[tensor(fashion_test.images[i])], request_id=str(i))
        for i in range(20)
    ]
    resps = list(stub.PredictStream(iter(reqs)))
    assert [r.request_id for r in resps] == [str(i) for i in range(20)]
    assert [r.predictions[0].classes[0].index for r in resps] == list(ort_probs[:20].argmax(1))


def test_get_model_info_reports_labels_input_provider_and_manifest(server):
    with Client(server.target) as client:
        info = client.model_info()
    assert info["name"] == MODEL and info["versions"] == [1]
    assert len(info["labels"]) == 10 and info["labels"][0] == "T-shirt/top"
    assert info["input"] == {"channels": 1, "height": 28, "width": 28}
    assert info["execution_provider"] == "CPUExecutionProvider"
    assert info["manifest"]["labels"] == info["labels"]


def test_concurrent_clients_are_batched_and_each_gets_its_own_rows(server, fashion_test, ort_probs):
    counted = {"model": MODEL, "version": "1"}
    batches = -server.value("convserve_batch_size_count", **counted)
    rows = -server.value("convserve_batch_size_sum", **counted)

    async def run() -> list[pb.PredictResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            calls = [
                stub.Predict(
                    pb.PredictRequest(
                        images=[tensor(fashion_test.images[i]) for i in range(j, j + 1 + j % 3)],
                        top_k=10,
                        request_id=str(j),
                    )
                )
                for j in range(64)
            ]
            return await asyncio.gather(*calls)

    resps = asyncio.run(run())
    for j, resp in enumerate(resps):
        assert resp.request_id == str(j)
        assert len(resp.predictions) == 1 + j % 3
        for k, p in enumerate(resp.predictions):
            np.testing.assert_allclose(probabilities(p), ort_probs[j + k], atol=1e-6)
    batches += server.value("convserve_batch_size_count", **counted)
    rows += server.value("convserve_batch_size_sum", **counted)
    assert rows == sum(1 + j % 3 for j in range(64))
    assert rows / batches > 1.5, f"{rows} rows in {batches} batches: not batched"


# ----------------------------------------------------------------------------- V2 / tritonclient
def test_v2_model_infer_raw_and_typed_contents_match_onnx_runtime(server, fashion_test, ort_probs):
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel())
    x = fashion_test.images[:5]
    raw = v2.ModelInferRequest(model_name=MODEL, id="r1", raw_input_contents=[x.tobytes()])
    raw.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
    resp = stub.ModelInfer(raw)
    assert resp.id == "r1" and [o.name for o in resp.outputs] == ["logits", "probabilities"]
    probs = np.frombuffer(resp.raw_output_contents[1], "<f4").reshape(5, 10)
    np.testing.assert_allclose(probs, ort_probs[:5], atol=1e-6)

    typed = v2.ModelInferRequest(model_name=MODEL, model_version="1")
    t = typed.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
    t.contents.uint_contents.extend(x.ravel().tolist())
    c = typed.outputs.add(name="probabilities")  # as top-2 "value:index:label" strings
    c.parameters["classification"].int64_param = 2
    resp = stub.ModelInfer(typed)
    assert [o.name for o in resp.outputs] == ["probabilities"]
    first = resp.raw_output_contents[0]
    n = int.from_bytes(first[:4], "little")
    value, index, label = first[4 : 4 + n].decode().split(":", 2)
    assert int(index) == ort_probs[0].argmax() and abs(float(value) - ort_probs[0].max()) < 1e-5
    with Client(server.target) as client:
        assert label == client.model_info()["labels"][int(index)]
    assert resp.outputs[0].datatype == "BYTES" and list(resp.outputs[0].shape) == [5, 2]


def test_v2_metadata_and_readiness(server):
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel())
    assert stub.ServerLive(v2.ServerLiveRequest()).live
    assert stub.ServerReady(v2.ServerReadyRequest()).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name=MODEL)).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name=MODEL, version="7")).ready
    meta = stub.ModelMetadata(v2.ModelMetadataRequest(name=MODEL))
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert meta.inputs[0].datatype == "UINT8" and list(meta.inputs[0].shape) == [-1, 1, 28, 28]
    assert stub.ServerMetadata(v2.ServerMetadataRequest()).name == "convserve"


@pytest.mark.slow  # its own venv (make test builds it)
def test_tritonclient_gets_the_same_probabilities_as_onnx_runtime(
    server, fashion_test, ort_probs, tmp_path, tritonclient_python
):
    x = fashion_test.images[:16]
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "triton_check.py"
    script.write_text(TRITON_SCRIPT)
    out = subprocess.run(
        [
            tritonclient_python,
            str(script),
            server.target,
            str(tmp_path / "x.npy"),
            MODEL,
            str(tmp_path / "p.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), ort_probs[:16], atol=1e-6)
    result = json.loads(out.stdout)
    assert len(result["top"]) == 3 and result["meta"]["platform"] == "onnxruntime_onnx"


# ----------------------------------------------------------------------------- bad input
def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 Mpixel, ~60 KB
    return buf.getvalue()


def _truncated_png(fashion_test) -> bytes:
    return png(fashion_test.images[0])[:60]


BAD_REQUESTS = {
    "undecodable bytes": lambda t: pb.PredictRequest(images=[pb.Image(encoded=b"not an image")]),
    "truncated png": lambda t: pb.PredictRequest(images=[pb.Image(encoded=_truncated_png(t))]),
    "decompression bomb": lambda t: pb.PredictRequest(images=[pb.Image(encoded=_bomb())]),
    "wrong tensor shape": lambda t: pb.PredictRequest(
        images=[tensor(t.images[0], shape=[1, 27, 29])]
    ),
    "wrong dtype": lambda t: pb.PredictRequest(
        images=[tensor(t.images[0], pb.DATA_TYPE_UNSPECIFIED)]
    ),
    "wrong byte length": lambda t: pb.PredictRequest(
        images=[tensor(t.images[0], data=t.images[0].tobytes()[:-1])]
    ),
    "empty request": lambda t: pb.PredictRequest(),
    "empty image": lambda t: pb.PredictRequest(images=[pb.Image()]),
    "too many images": lambda t: pb.PredictRequest(images=[tensor(t.images[0])] * 301),
    "nan in float input": lambda t: pb.PredictRequest(
        images=[tensor(np.full((1, 28, 28), np.nan, np.float32), pb.FLOAT32)]
    ),
    "float out of range": lambda t: pb.PredictRequest(
        images=[tensor(np.full((1, 28, 28), 300.0, np.float32), pb.FLOAT32)]
    ),
    "negative top_k": lambda t: pb.PredictRequest(images=[tensor(t.images[0])], top_k=-1),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_invalid_argument_and_the_next_good_request_succeeds(
    server, fashion_test, case
):
    stub = pb_grpc.ClassifierStub(server.channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(BAD_REQUESTS[case](fashion_test), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details()
    ok = stub.Predict(pb.PredictRequest(images=[tensor(fashion_test.images[0])]), timeout=30)
    assert len(ok.predictions) == 1


def test_unknown_model_or_version_is_not_found(server, fashion_test):
    stub = pb_grpc.ClassifierStub(server.channel())
    img = [tensor(fashion_test.images[0])]
    for req in (
        pb.PredictRequest(model="nope", images=img),
        pb.PredictRequest(model=MODEL, version=9, images=img),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_message_over_the_limit_is_resource_exhausted(server, fashion_test, ort_probs):
    stub = pb_grpc.ClassifierStub(server.channel())
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictRequest(images=[pb.Image(encoded=b"\0" * 2_100_000)]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_answers_first_image(stub, fashion_test, ort_probs)  # and the server serves on


def assert_answers_first_image(stub: pb_grpc.ClassifierStub, fashion_test, ort_probs) -> None:
    """A one-image Predict gets ONNX Runtime's probabilities for that image."""
    request = pb.PredictRequest(images=[tensor(fashion_test.images[0])], top_k=10)
    (prediction,) = stub.Predict(request, timeout=30).predictions
    np.testing.assert_allclose(probabilities(prediction), ort_probs[0], atol=1e-6)


def test_v2_bad_tensors_get_invalid_argument(server, fashion_test):
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel())
    x = fashion_test.images[:2]
    cases = []
    for shape, dtype, data in (
        ([2, 1, 28, 28], "UINT8", x.tobytes()[:-3]),
        ([2, 28, 28], "UINT8", x.tobytes()),
        ([2, 1, 28, 28], "INT64", x.tobytes()),
    ):
        r = v2.ModelInferRequest(model_name=MODEL, raw_input_contents=[data])
        r.inputs.add(name="images", datatype=dtype, shape=shape)
        cases.append(r)
    for r in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(r)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_v2_refuses_a_datatype_other_than_the_models_naming_it(server, fashion_test):
    """FP32 for the model's UINT8 input is refused, raw or typed, as Triton and the Open
    Inference Protocol do; the message names the datatype and shape the model takes."""
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel())
    x = fashion_test.images[:2].astype(np.float32)  # whole pixel values: still refused
    raw = v2.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.tobytes()])
    raw.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    typed = v2.ModelInferRequest(model_name=MODEL)
    t = typed.inputs.add(name="images", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    for r in (raw, typed):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(r)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be UINT8 with shape [-1, 1, 28, 28]" in err.value.details()
        assert "got FP32" in err.value.details()


def test_fractional_float_pixels_are_refused_and_whole_ones_taken(server, fashion_test):
    """0..1 floats (torchvision's ToTensor) would round to a black-and-white image: refused,
    saying what to send; whole-valued floats are pixels (test_raw_uint8_and_float32...)."""
    stub = pb_grpc.ClassifierStub(server.channel())
    x = np.minimum(fashion_test.images[0], 254).astype(np.float32)  # room for + 0.25
    for floats in (x / 255, x + 0.25):
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(pb.PredictRequest(images=[tensor(floats, pb.FLOAT32)]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must be whole values 0..255" in err.value.details()
        assert "ToTensor" in err.value.details()
    nearly = x + np.float32(0.0005)  # within 1e-3 of a whole value: a pixel
    resp = stub.Predict(pb.PredictRequest(images=[tensor(nearly, pb.FLOAT32)]))
    assert len(resp.predictions) == 1


def test_v2_names_the_missing_model_before_judging_its_tensors(server, fashion_test):
    """A request for a model that is not served gets NOT_FOUND, however bad its tensors:
    the model is resolved before its input is read."""
    stub = v2_grpc.GRPCInferenceServiceStub(server.channel())
    x = fashion_test.images[0].tobytes()
    for version in ("", "x9"):
        r = v2.ModelInferRequest(model_name="nope", model_version=version)
        r.inputs.add(name="images", datatype="UINT8", shape=[1, 1, 28, 28])
        r.raw_input_contents.extend([x, x])  # two tensors for one input
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(r)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()


# ----------------------------------------------------------------------------- health, reflection
def test_health_is_serving_and_reflection_lists_every_service(server):
    ch = server.channel()
    health = health_pb2_grpc.HealthStub(ch)
    for name in ("", "convserve.v1.Classifier", "inference.GRPCInferenceService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {
        "convserve.v1.Classifier",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    } <= services


def test_health_is_not_serving_until_a_model_loads(tmp_path, model_repository):
    repo = tmp_path / "repo"
    repo.mkdir()
    with serving(repo, poll_interval=0.2) as server:  # a clean stop on exit, or it raises
        assert check(server.target) == "NOT_SERVING"
        shutil.copytree(model_repository / MODEL, repo / MODEL)
        wait_for("SERVING once the model loaded", lambda: check(server.target) == "SERVING", 30)


# ----------------------------------------------------------------------------- load shedding
def test_full_queue_sheds_with_resource_exhausted(model_repository, fashion_test, ort_probs):
    with serving(
        model_repository, max_batch_size=1, max_queue_size=300, max_images_per_request=300
    ) as s:
        stub = pb_grpc.ClassifierStub(s.channel())
        big = pb.PredictRequest(images=[tensor(x) for x in fashion_test.images[:280]])
        calls = [stub.Predict.future(big) for _ in range(6)]  # 6 x 280 rows > 300 queued
        codes = []
        for call in calls:
            try:
                assert len(call.result().predictions) == 280
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        shed = s.value("convserve_rejected_requests_total", reason="queue_full")
        assert shed == codes.count("RESOURCE_EXHAUSTED")
        assert_answers_first_image(stub, fashion_test, ort_probs)  # served again once drained


def queue_600_rows(s, stub, fashion_test) -> tuple[list, Callable[[], bool]]:
    """Two 300-image Predicts sent to a server batching one row at a time, once they queue;
    and a test of whether rows are still queued."""
    counted = {"model": MODEL, "version": "1"}
    big = [
        stub.Predict.future(
            pb.PredictRequest(images=[tensor(x) for x in fashion_test.images[:300]])
        )
        for _ in range(2)
    ]
    queued = lambda: s.value("convserve_queue_depth", **counted) > 0  # noqa: E731
    wait_for("the big requests to queue", queued, every=0.001)
    return big, queued


def test_expired_deadlines_never_run(model_repository, fashion_test):
    counted = {"model": MODEL, "version": "1"}
    # Admitted to the queue, then expired there (shedding at admission would refuse them).
    plain_queue = {"max_batch_size": 1, "max_images_per_request": 300, "shed_by_deadline": False}
    with serving(model_repository, **plain_queue) as s:
        stub = pb_grpc.ClassifierStub(s.channel())
        big, queued = queue_600_rows(s, stub, fashion_test)
        expired = 0
        for _ in range(10):  # each waits behind up to 600 single-row runs: its deadline passes
            try:
                stub.Predict(
                    pb.PredictRequest(images=[tensor(fashion_test.images[0])]), timeout=0.005
                )
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                expired += 1
        assert all(len(b.result().predictions) == 300 for b in big)
        idle = lambda: not s.value("convserve_inflight_requests") and not queued()  # noqa: E731
        wait_for("every request to be answered or dropped", idle)  # nothing left to compute
        items = s.value("convserve_inference_items_total", **counted)
        assert expired >= 1, "no request expired: the test proved nothing"
        assert items == 600 + (10 - expired), "an expired request was computed"


# ----------------------------------------------------------------------------- hot swap
def _publish(src: Path, dst_model: Path, version: int) -> None:
    tmp = dst_model / f".tmp-{version}"
    shutil.copytree(src, tmp)
    tmp.rename(dst_model / str(version))  # atomic, as the exporter does


def test_hot_swap_under_load_loses_nothing_and_a_broken_version_leaves_the_old(
    model_repository, tmp_path, fashion_test
):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    with serving(repo, poll_interval=0.1) as s:
        stop = threading.Event()
        seen: list[int] = []
        errors: list[str] = []

        def load() -> None:
            with Client(s.target) as c:
                while not stop.is_set():
                    try:
                        seen.append(c.predict([fashion_test.images[0]])[0].version)
                    except PredictionError as exc:
                        errors.append(str(exc))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        failures = {"model": MODEL, "reason": "checksum"}  # the manifest names the real file
        try:
            answered = lambda n: lambda: len(seen) + len(errors) >= n  # noqa: E731
            wait_for("the load to be answered by version 1", answered(20))
            _publish(repo / MODEL / "1", repo / MODEL, 2)
            wait_for("answers from version 2", lambda: seen and seen[-1] == 2, timeout=30)
            broken = tmp_path / "broken"
            shutil.copytree(repo / MODEL / "1", broken)
            (broken / "model.onnx").write_bytes(b"\x08\x07garbage")
            _publish(broken, repo / MODEL, 3)
            refused = lambda: s.value("convserve_model_load_failures_total", **failures)  # noqa: E731
            wait_for("version 3 to be refused", refused, timeout=30)
            wait_for("the load to go on after the refusal", answered(len(seen) + len(errors) + 20))
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:3]
        assert 1 in seen and seen[-1] == 2
        with Client(s.target) as client:
            assert client.model_info()["version"] == 2
        assert s.value("convserve_model_swaps_total", model=MODEL) == 1
        assert s.value("convserve_model_load_failures_total", **failures) == 1
        assert "refused fashion-mnist version 3" in s.log()


def test_a_call_the_queue_would_make_late_is_refused_at_once_and_never_queued(
    model_repository, fashion_test
):
    counted = {"model": MODEL, "version": "1"}
    with serving(model_repository, max_batch_size=1, max_images_per_request=300) as s:
        stub = pb_grpc.ClassifierStub(s.channel())
        one = pb.PredictRequest(images=[tensor(fashion_test.images[0])])
        stub.Predict(one)  # the batcher learns what a run costs
        big, queued = queue_600_rows(s, stub, fashion_test)
        codes = []
        for _ in range(10):  # up to 600 single-row runs ahead of each: far beyond 5 ms
            try:
                stub.Predict(one, timeout=0.005)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "overloaded" in exc.details(), exc.details()
        assert all(len(b.result().predictions) == 300 for b in big)
        refused = codes.count("RESOURCE_EXHAUSTED")
        # Refused while the queue was long; one that came as it emptied may be admitted.
        assert refused >= 1 and set(codes) <= {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "OK"}
        assert s.value("convserve_rejected_requests_total", reason="overloaded") == refused
        idle = lambda: not s.value("convserve_inflight_requests") and not queued()  # noqa: E731
        wait_for("every request to be answered or dropped", idle)
        # The refused calls never reached the queue, so never ONNX Runtime.
        items = s.value("convserve_inference_items_total", **counted)
        assert items <= 1 + 600 + (10 - refused), items


# ----------------------------------------------------------------------------- shutdown
def test_sigterm_under_load_completes_every_admitted_request(
    model_repository, tmp_path, fashion_test
):
    s = start_server(
        model_repository, tmp_path, "--max-batch-size", "8", "--max-images-per-request", "300"
    )
    stub = pb_grpc.ClassifierStub(s.channel())
    calls = [
        stub.Predict.future(
            pb.PredictRequest(images=[tensor(x) for x in fashion_test.images[:200]])
        )
        for _ in range(6)
    ]

    def admitted() -> bool:  # each call is in its handler or already answered
        text = s.metrics()
        handled = metric_value(text, "convserve_requests_total", method="Predict")
        return metric_value(text, "convserve_inflight_requests") + handled == 6

    wait_for("the six calls to be admitted", admitted, every=0.01)
    assert s.stop() == 0
    for call in calls:
        assert len(call.result().predictions) == 200
    assert "draining" in s.log()
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictRequest(images=[tensor(fashion_test.images[0])]), timeout=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_during_a_burst_answers_every_call_and_cancels_none(
    model_repository, tmp_path, fashion_test
):
    """400 calls of 8 images at once, far more than a batch, and 100 more once the server
    says it is draining: those it had received but not yet handled when SIGTERM came, and
    those that arrive while it drains, are refused UNAVAILABLE (go elsewhere), never
    CANCELLED, which a client reads as its own doing."""
    s = start_server(model_repository, tmp_path, "--max-batch-size", "8")
    request = pb.PredictRequest(images=[tensor(x) for x in fashion_test.images[:8]])
    channels = [s.channel() for _ in range(4)]
    try:
        stubs = [pb_grpc.ClassifierStub(ch) for ch in channels]
        calls = [stubs[i % 4].Predict.future(request, timeout=60) for i in range(400)]
        # SIGTERM once the server is answering the burst (a condition, not a sleep: on a
        # busy machine the whole burst can be taken in before a fixed delay ends).
        wait_for("the first answer", lambda: any(c.done() for c in calls), 30, every=0.005)
        s.proc.send_signal(signal.SIGTERM)
        wait_for("the draining line", lambda: "draining:" in s.log(), 30, every=0.01)
        calls += [stubs[i % 4].Predict.future(request, timeout=60) for i in range(100)]
        assert s.proc.wait(60) == 0
        codes = Counter(
            "OK" if call.exception() is None else call.exception().code().name for call in calls
        )
    finally:
        for ch in channels:
            ch.close()
        s.stop()
    assert codes["CANCELLED"] == 0, codes
    assert set(codes) <= {"OK", "UNAVAILABLE", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] > 0 and codes["UNAVAILABLE"] > 0, codes


# ----------------------------------------------------------------------------- devices, workers
def test_explicit_cuda_without_cuda_fails_at_start_with_the_reason(model_repository, tmp_path):
    s = start_server(model_repository, tmp_path, "--device", "cuda", wait=False)
    assert s.proc.wait(60) != 0
    assert "--device cuda was requested but CUDAExecutionProvider" in s.log()


def test_auto_device_falls_back_to_cpu_loudly_and_reports_it(model_repository):
    with serving(model_repository, device="auto") as s:
        with Client(s.target) as client:
            assert client.model_info()["execution_provider"] == "CPUExecutionProvider"
        assert "FALLBACK" in s.log()
        assert s.value("convserve_execution_provider_fallback", model=MODEL) == 1
        info = s.samples("convserve_model_info")
        assert sum(v for labels, v in info if labels["provider"] == "CPUExecutionProvider") == 1


@pytest.mark.slow  # about 2 s: three processes
def test_two_workers_share_the_port(model_repository, tmp_path, fashion_test):
    with running_server(model_repository, tmp_path, "--workers", "2") as s:
        for _ in range(8):  # new channels: SO_REUSEPORT spreads connections
            with Client(s.target) as c:
                assert c.predict([fashion_test.images[0]])[0].version == 1

        def workers(text: str) -> set[str]:
            return {
                line.split('pid="')[1].split('"')[0]
                for line in text.splitlines()
                if line.startswith("convserve_process_resident_memory_bytes{")
            }

        def settled() -> str | None:  # the second worker may still be loading its model
            text = s.metrics()
            answered = metric_value(text, "convserve_requests_total", code="OK") >= 8
            return text if answered and len(workers(text)) >= 2 else None

        text = wait_for("both workers and the 8 answers in the parent's /metrics", settled)
        assert metric_value(text, "convserve_requests_total", method="Predict", code="OK") == 8
        assert len(workers(text)) == 2


@pytest.mark.parametrize(
    ("flag", "loop"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")]
)
def test_each_event_loop_serves_and_drains(
    model_repository, tmp_path, fashion_test, ort_probs, flag, loop
):
    s = start_server(model_repository, tmp_path, "--event-loop", flag)
    try:
        # Health may say SERVING a moment before the "listening on" line is written.
        wait_for("the 'listening on' line", lambda: "listening on" in s.log(), 10, every=0.05)
        assert f"{loop} event loop" in s.log()  # auto: uvloop, a dependency on this platform
        with Client(s.target) as c:
            preds = c.predict(list(fashion_test.images[:8]), top_k=2)
        assert [p.index for p in preds] == ort_probs[:8].argmax(1).tolist()
    finally:
        assert s.stop() == 0, s.log()
    assert "stopped" in s.log()


def test_serving_never_imports_torch():
    code = (
        "import sys, serving.main, serving.server, serving.client; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@pytest.mark.parametrize("mean", [None, [], [0.3, 0.3], ["0.3"], [1.5]])
def test_a_manifest_without_a_usable_training_mean_is_refused(model_repository, tmp_path, mean):
    """Explain fills occluded patches with the manifest's mean: a version without a usable
    one is refused at load with the reason, not failed later with INTERNAL."""
    from serving.errors import ModelLoadError
    from serving.model import read_manifest

    version = tmp_path / "1"
    shutil.copytree(model_repository / MODEL / "1", version)
    manifest = json.loads((version / "manifest.json").read_text())
    read_manifest(version)  # as exported: accepted
    if mean is None:
        del manifest["mean"]
    else:
        manifest["mean"] = mean
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"'mean' (must list 1|is missing)"):
        read_manifest(version)


@pytest.mark.parametrize(
    "mode, allow, stop", [("run", "1", "1"), ("off", "0", "0"), ("always", "1", "0")]
)
def test_intra_op_workers_spin_within_a_run_and_stop_when_it_ends(mode, allow, stop):
    from serving.runtime import session_options
    from serving.settings import ServerSettings

    so = session_options(ServerSettings(spinning=mode).runtime)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == allow
    assert so.get_session_config_entry("session.force_spinning_stop") == stop
    assert ServerSettings().runtime.spinning == "run"


def test_an_unknown_spinning_mode_is_refused():
    from serving.settings import ServerSettings

    with pytest.raises(ValueError, match="spinning must be one of"):
        ServerSettings(spinning="sometimes")


def test_variant_int8_serves_the_int8_file_with_its_own_answers(
    model_repository, fashion_test, version_dir
):
    x = fashion_test.images[:16]
    int8 = ort.InferenceSession(
        str(version_dir / "model.int8.onnx"), providers=["CPUExecutionProvider"]
    )
    want = int8.run(["probabilities"], {"images": x})[0]
    fp32 = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(want - fp32.run(["probabilities"], {"images": x})[0]).max() > 1e-4  # distinct
    with serving(model_repository, variant="int8") as s:
        stub = pb_grpc.ClassifierStub(s.channel())
        resp = stub.Predict(pb.PredictRequest(images=[tensor(i) for i in x], top_k=10))
        for row, p in zip(want, resp.predictions, strict=True):
            np.testing.assert_allclose(probabilities(p), row, atol=1e-6)
        assert "model.int8.onnx" in s.log()
