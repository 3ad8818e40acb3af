"""Triton's gRPC extensions (serving/grpc/extensions.py), end to end on loopback: stream
inference, model configuration, statistics, the repository index and explicit model
control, system shared memory, trace and log settings. In-process servers and our own
stubs for behaviour; tritonclient.grpc, from its venv, for what a Triton user's script does,
its answers checked against ONNX Runtime in-process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from serving.proto.inference import grpc_predict_v2_pb2 as pb
from serving.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.settings import server_settings
from tests.inprocess import serving
from tests.serving_helpers import ROOT

MODEL = "fashion-mnist"
CLIENT_SCRIPT = ROOT / "tests" / "clients" / "triton_grpc_extensions.py"


@pytest.fixture(scope="module")
def images(model_repository) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def ort_probs(model_repository, images) -> np.ndarray:
    path = model_repository / MODEL / "1" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"images": images})[0]


@pytest.fixture(scope="module")
def server(model_repository):
    with serving(model_repository, poll_interval=0) as s:
        yield s


@pytest.fixture
def stub(server):
    with server.channel() as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def infer_request(x: np.ndarray, **kw) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, **kw)
    req.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    req.outputs.add(name="probabilities")
    return req


def probabilities(resp: pb.ModelInferResponse) -> np.ndarray:
    (i,) = [n for n, o in enumerate(resp.outputs) if o.name == "probabilities"]
    return np.frombuffer(resp.raw_output_contents[i], "<f4").reshape(list(resp.outputs[i].shape))


# ----------------------------------------------------------------------------- streams
def test_stream_inference_answers_in_order_and_a_bad_request_in_band(stub, images, ort_probs):
    bad = pb.ModelInferRequest(model_name=MODEL, id="bad")
    bad.inputs.add(name="images", datatype="FP32", shape=[1, 1, 28, 28])
    bad.raw_input_contents.append(np.zeros(784, np.float32).tobytes())
    requests = [infer_request(images[i : i + 2], id=str(i)) for i in range(3)]
    requests.insert(1, bad)
    answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert [a.infer_response.id for a in answers] == ["0", "bad", "1", "2"]
    assert "INVALID_ARGUMENT" in answers[1].error_message and "UINT8" in answers[1].error_message
    for a, i in zip([answers[0], *answers[2:]], range(3), strict=True):
        assert not a.error_message
        np.testing.assert_allclose(probabilities(a.infer_response), ort_probs[i : i + 2], atol=1e-6)


# ----------------------------------------------------------------------------- configuration
def test_model_config_is_the_config_pbtxt_completed_with_how_it_is_served(stub, server):
    config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL)).config
    assert config.name == MODEL and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == server.settings.max_batch_size
    (inp,) = config.input
    assert inp.name == "images" and list(inp.dims) == [1, 28, 28]
    assert [o.name for o in config.output] == ["logits", "probabilities"]
    (group,) = config.instance_group
    assert group.count == server.settings.instances and group.kind == group.KIND_CPU
    assert config.default_model_filename == "model.onnx"
    extensions = stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
    assert {"model_configuration", "model_repository", "statistics"} <= set(extensions)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelConfig(pb.ModelConfigRequest(name="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_statistics_count_requests_images_runs_and_failures(server, images):
    with server.channel() as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL)).model_stats[0]
        for n in (1, 3, 8):
            stub.ModelInfer(infer_request(images[:n]))
        bad = infer_request(images[:1])
        bad.inputs[0].datatype = "FP32"
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(bad)
        after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL)).model_stats[0]
    s, b = after.inference_stats, before.inference_stats
    assert after.version == "1"
    assert s.success.count - b.success.count == 3 and s.fail.count - b.fail.count == 1
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count == 3  # one at a time: a run each
    assert s.compute_infer.count - b.compute_infer.count == 3
    assert s.compute_infer.ns > b.compute_infer.ns and s.success.ns > b.success.ns
    assert s.queue.count - b.queue.count == 3
    assert {x.batch_size for x in after.batch_stats} >= {1, 3, 8}
    assert after.last_inference > 0
    with server.channel() as ch:
        everyone = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest())
    assert [m.name for m in everyone.model_stats] == [MODEL]


# ----------------------------------------------------------------------------- repository
def test_explicit_control_loads_and_unloads_only_what_it_is_asked(model_repository, images):
    with serving(model_repository, model_control_mode="explicit") as s, s.channel() as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
        assert [(m.name, m.state) for m in index] == [(MODEL, "UNAVAILABLE")]
        assert not stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(infer_request(images[:1]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL))
        ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        assert [(m.name, m.version, m.state) for m in ready] == [(MODEL, "1", "READY")]
        assert probabilities(stub.ModelInfer(infer_request(images[:2]))).shape == (2, 10)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL))
        assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
        for bad in ("nope", "../etc"):
            with pytest.raises(grpc.RpcError) as err:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=bad))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_model_control_in_poll_mode_is_a_failed_precondition(stub):
    for call in (
        lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL)),
        lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode explicit" in err.value.details()


def test_none_mode_loads_at_start_and_refuses_model_control(model_repository, images):
    with serving(model_repository, model_control_mode="none") as s, s.channel() as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert probabilities(stub.ModelInfer(infer_request(images[:1]))).shape == (1, 10)
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--model-control-mode none" in err.value.details()
        assert s.app is not None and s.app.repository._poller is None  # never scans again


def test_a_broken_model_is_listed_unavailable_with_its_reason(model_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(model_repository, repo)
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"not a model")
    with serving(repo, poll_interval=0) as s, s.channel() as ch:
        index = pb_grpc.GRPCInferenceServiceStub(ch).RepositoryIndex(pb.RepositoryIndexRequest())
    states = {m.name: (m.state, m.reason) for m in index.models}
    assert states[MODEL] == ("READY", "")
    assert states["broken"][0] == "UNAVAILABLE" and "manifest" in states["broken"][1]


def test_explicit_mode_with_a_poll_interval_is_refused_at_start(capsys):
    with pytest.raises(SystemExit):
        server_settings(["--model-control-mode", "explicit", "--poll-interval", "5"])
    assert "contradicts --model-control-mode explicit" in capsys.readouterr().err
    assert server_settings(["--model-control-mode", "none"]).poll_seconds == 0


def test_model_control_needs_the_admin_group(model_repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("app inference,metadata\nops\n")
    settings = {"model_control_mode": "explicit", "auth_token_file": tokens}
    with serving(model_repository, **settings) as s, s.channel() as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        load = pb.RepositoryModelLoadRequest(model_name=MODEL)
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(load, metadata=[("authorization", "Bearer app")])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stub.RepositoryModelLoad(load, metadata=[("authorization", "Bearer ops")])
        assert stub.ModelReady(
            pb.ModelReadyRequest(name=MODEL), metadata=[("authorization", "Bearer app")]
        ).ready


# ----------------------------------------------------------------------------- shared memory
@pytest.fixture
def region():
    """A POSIX shared-memory file in /dev/shm, as tritonclient's shared_memory makes one."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    key = f"/convserve-test-{uuid.uuid4().hex[:8]}"
    path = Path("/dev/shm" + key)
    path.write_bytes(bytes(8 * 784 + 8 * 40))
    yield key, path
    path.unlink(missing_ok=True)


def test_shared_memory_carries_inputs_and_outputs(stub, region, images, ort_probs):
    key, path = region
    data = bytearray(path.read_bytes())
    data[: images.nbytes] = images.tobytes()
    path.write_bytes(data)
    n_in, n_out = images.nbytes, 8 * 40
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="in", key=key, byte_size=n_in)
    )
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="out", key=key, offset=n_in, byte_size=n_out)
    )
    try:
        status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
        assert status["out"].offset == n_in and status["in"].key == key
        req = pb.ModelInferRequest(model_name=MODEL)
        t = req.inputs.add(name="images", datatype="UINT8", shape=[8, 1, 28, 28])
        t.parameters["shared_memory_region"].string_param = "in"
        t.parameters["shared_memory_byte_size"].int64_param = n_in
        o = req.outputs.add(name="probabilities")
        o.parameters["shared_memory_region"].string_param = "out"
        o.parameters["shared_memory_byte_size"].int64_param = n_out
        resp = stub.ModelInfer(req)
        assert resp.raw_output_contents[0] == b""  # the bytes went to the region
        got = np.frombuffer(path.read_bytes()[n_in:], "<f4").reshape(8, 10)
        np.testing.assert_allclose(got, ort_probs, atol=1e-6)
        o.parameters["shared_memory_byte_size"].int64_param = 8  # too small for the answer
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


def test_shared_memory_keys_outside_dev_shm_or_not_ours_are_refused(stub, region, tmp_path):
    key, path = region
    link = Path(f"/dev/shm{key}-link")
    link.symlink_to(path)
    try:
        for bad in ("/../etc/passwd", "/a/b", f"{key}-link", "/no-such-region"):
            with pytest.raises(grpc.RpcError) as err:
                stub.SystemSharedMemoryRegister(
                    pb.SystemSharedMemoryRegisterRequest(name="x", key=bad, byte_size=16)
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        with pytest.raises(grpc.RpcError) as err:  # larger than the file
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="x", key=key, byte_size=10**9)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        link.unlink()


# ----------------------------------------------------------------------------- settings
def test_log_settings_read_and_set_the_servers_log_level(stub):
    logger = logging.getLogger("convserve")
    got = stub.LogSettings(pb.LogSettingsRequest()).settings
    assert got["log_info"].bool_param and got["log_verbose_level"].uint32_param == 0
    level = logger.level
    try:
        req = pb.LogSettingsRequest()
        req.settings["log_verbose_level"].uint32_param = 1
        assert stub.LogSettings(req).settings["log_verbose_level"].uint32_param == 1
        assert logger.getEffectiveLevel() == logging.DEBUG
        req = pb.LogSettingsRequest()
        req.settings["log_file"].string_param = "/tmp/elsewhere.log"
        with pytest.raises(grpc.RpcError) as err:
            stub.LogSettings(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        logger.setLevel(level)


def test_trace_settings_say_tracing_is_off_and_refuse_to_turn_it_on(stub):
    # Started without OTEL_TRACES_EXPORTER: no exporter to turn on (tests/test_tracing.py
    # switches a tracing server off and on).
    settings = stub.TraceSetting(pb.TraceSettingRequest()).settings
    assert list(settings["trace_level"].value) == ["OFF"]
    assert list(settings["trace_mode"].value) == ["opentelemetry"]
    req = pb.TraceSettingRequest()
    req.settings["trace_level"].value.append("TIMESTAMPS")
    with pytest.raises(grpc.RpcError) as err:
        stub.TraceSetting(req)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# ----------------------------------------------------------------------------- tritonclient
@pytest.mark.slow  # its own venv (make test builds it)
def test_tritonclients_ten_calls_answer_what_onnx_runtime_computes(
    model_repository, images, ort_probs, tmp_path, tritonclient_python
):
    np.save(tmp_path / "x.npy", images)
    with serving(model_repository, model_control_mode="explicit") as s:
        out = subprocess.run(
            [tritonclient_python, str(CLIENT_SCRIPT), s.target, MODEL,
             str(tmp_path / "x.npy"), str(tmp_path / "out.json")],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["index_before"]["models"][0]["state"] == "UNAVAILABLE"
    assert got["load"] == "ok" and got["ready"] is True
    assert got["index_after"]["models"][0]["state"] == "READY"
    assert got["config"]["config"]["max_batch_size"] == 64
    np.testing.assert_allclose(got["async_infer"], ort_probs[:4], atol=1e-6)
    assert len(got["classification"]) == 6
    assert got["classification"][0].split(":")[1] == str(ort_probs[0].argmax())
    stream = got["stream"]
    assert [s.get("id") for s in stream] == ["0", "1", None, "3"]
    assert "UINT8" in stream[2]["error"]
    for i in (0, 1, 3):
        np.testing.assert_allclose(stream[i]["p"], ort_probs[i : i + 1], atol=1e-6)
    assert set(got["shm_status"]["regions"]) == {"cs_in", "cs_out"}
    np.testing.assert_allclose(got["shm"], ort_probs, atol=1e-6)
    assert not got["shm_status_after"].get("regions")
    stats = got["statistics"]["model_stats"][0]
    assert int(stats["inference_count"]) == 4 + 2 + 3 + 8
    assert int(stats["inference_stats"]["fail"]["count"]) == 1
    assert got["trace"]["settings"]["trace_level"]["value"] == ["OFF"]
    assert got["trace_on"]["error"] == "StatusCode.FAILED_PRECONDITION"
    assert got["log_verbose"]["settings"]["log_verbose_level"]["uint32_param"] == 1
    assert got["unload"] == "ok" and got["ready_after_unload"] is False
