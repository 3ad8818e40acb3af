"""protos/ and the generated code in serving/proto/: fresh, importable, and wire-compatible.

The V2 field numbers below are the published ones (kserve/open-inference-protocol
specification/protocol/open_inference_grpc.proto; the same numbers as Triton's
grpc_service.proto, which tritonclient is built from). They are written out here rather
than read from our .proto so that an edit to the .proto cannot silently move them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serving.proto.convserve.v1 import classifier_pb2, classifier_pb2_grpc
from serving.proto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc, model_config_pb2

REPO = Path(__file__).resolve().parents[1]
GENERATED = REPO / "serving" / "proto"

# message (nested ones dotted) -> {field name: field number}, for every message.
V2_FIELDS = {
    "ServerLiveRequest": {},
    "ServerLiveResponse": {"live": 1},
    "ServerReadyRequest": {},
    "ServerReadyResponse": {"ready": 1},
    "ModelReadyRequest": {"name": 1, "version": 2},
    "ModelReadyResponse": {"ready": 1},
    "ServerMetadataRequest": {},
    "ServerMetadataResponse": {"name": 1, "version": 2, "extensions": 3},
    "ModelMetadataRequest": {"name": 1, "version": 2},
    "ModelMetadataResponse": {
        "name": 1,
        "versions": 2,
        "platform": 3,
        "inputs": 4,
        "outputs": 5,
    },
    "ModelMetadataResponse.TensorMetadata": {"name": 1, "datatype": 2, "shape": 3},
    "ModelInferRequest": {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "inputs": 5,
        "outputs": 6,
        "raw_input_contents": 7,
    },
    "ModelInferRequest.InferInputTensor": {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    },
    "ModelInferRequest.InferRequestedOutputTensor": {"name": 1, "parameters": 2},
    "ModelInferResponse": {
        "model_name": 1,
        "model_version": 2,
        "id": 3,
        "parameters": 4,
        "outputs": 5,
        "raw_output_contents": 6,
    },
    "ModelInferResponse.InferOutputTensor": {
        "name": 1,
        "datatype": 2,
        "shape": 3,
        "parameters": 4,
        "contents": 5,
    },
    "InferParameter": {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "double_param": 4,
        "uint64_param": 5,
    },
    "InferTensorContents": {
        "bool_contents": 1,
        "int_contents": 2,
        "int64_contents": 3,
        "uint_contents": 4,
        "uint64_contents": 5,
        "fp32_contents": 6,
        "fp64_contents": 7,
        "bytes_contents": 8,
    },
}

# Triton's extension messages (triton-inference-server/common protobuf/grpc_service.proto,
# the numbers tritonclient.grpc 2.73's service_pb2 carries; the slow test below compares
# with tritonclient itself).
V2_FIELDS |= {
    "ModelStreamInferResponse": {"error_message": 1, "infer_response": 2},
    "ModelConfigRequest": {"name": 1, "version": 2},
    "ModelConfigResponse": {"config": 1},
    "ModelStatisticsRequest": {"name": 1, "version": 2},
    "StatisticDuration": {"count": 1, "ns": 2},
    "InferStatistics": {
        "success": 1,
        "fail": 2,
        "queue": 3,
        "compute_input": 4,
        "compute_infer": 5,
        "compute_output": 6,
        "cache_hit": 7,
        "cache_miss": 8,
    },
    "InferBatchStatistics": {
        "batch_size": 1,
        "compute_input": 2,
        "compute_infer": 3,
        "compute_output": 4,
    },
    "ModelStatistics": {
        "name": 1,
        "version": 2,
        "last_inference": 3,
        "inference_count": 4,
        "execution_count": 5,
        "inference_stats": 6,
        "batch_stats": 7,
    },
    "ModelStatisticsResponse": {"model_stats": 1},
    "ModelRepositoryParameter": {
        "bool_param": 1,
        "int64_param": 2,
        "string_param": 3,
        "bytes_param": 4,
    },
    "RepositoryIndexRequest": {"repository_name": 1, "ready": 2},
    "RepositoryIndexResponse": {"models": 1},
    "RepositoryIndexResponse.ModelIndex": {"name": 1, "version": 2, "state": 3, "reason": 4},
    "RepositoryModelLoadRequest": {"repository_name": 1, "model_name": 2, "parameters": 3},
    "RepositoryModelLoadResponse": {},
    "RepositoryModelUnloadRequest": {"repository_name": 1, "model_name": 2, "parameters": 3},
    "RepositoryModelUnloadResponse": {},
    "SystemSharedMemoryStatusRequest": {"name": 1},
    "SystemSharedMemoryStatusResponse": {"regions": 1},
    "SystemSharedMemoryStatusResponse.RegionStatus": {
        "name": 1,
        "key": 2,
        "offset": 3,
        "byte_size": 4,
    },
    "SystemSharedMemoryRegisterRequest": {"name": 1, "key": 2, "offset": 3, "byte_size": 4},
    "SystemSharedMemoryRegisterResponse": {},
    "SystemSharedMemoryUnregisterRequest": {"name": 1},
    "SystemSharedMemoryUnregisterResponse": {},
    "TraceSettingRequest": {"settings": 1, "model_name": 2},
    "TraceSettingRequest.SettingValue": {"value": 1},
    "TraceSettingResponse": {"settings": 1},
    "TraceSettingResponse.SettingValue": {"value": 1},
    "LogSettingsRequest": {"settings": 1},
    "LogSettingsRequest.SettingValue": {"bool_param": 1, "uint32_param": 2, "string_param": 3},
    "LogSettingsResponse": {"settings": 1},
    "LogSettingsResponse.SettingValue": {"bool_param": 1, "uint32_param": 2, "string_param": 3},
}

# Triton's model_config.proto, the subset we fill (same numbers as model_config_pb2).
MODEL_CONFIG_FIELDS = {
    "ModelConfig": {
        "name": 1,
        "platform": 2,
        "backend": 17,
        "version_policy": 3,
        "max_batch_size": 4,
        "input": 5,
        "output": 6,
        "dynamic_batching": 11,
        "instance_group": 7,
        "default_model_filename": 8,
    },
    "ModelInput": {"name": 1, "data_type": 2, "format": 3, "dims": 4},
    "ModelOutput": {"name": 1, "data_type": 2, "dims": 3, "label_filename": 4},
    "ModelInstanceGroup": {"name": 1, "kind": 4, "count": 2, "gpus": 3},
    "ModelVersionPolicy": {"latest": 1, "all": 2, "specific": 3},
    "ModelVersionPolicy.Latest": {"num_versions": 1},
    "ModelVersionPolicy.All": {},
    "ModelVersionPolicy.Specific": {"versions": 1},
    "ModelDynamicBatching": {
        "preferred_batch_size": 1,
        "max_queue_delay_microseconds": 2,
        "preserve_ordering": 3,
    },
}

V2_METHODS = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
    "ModelStreamInfer": ("ModelInferRequest", "ModelStreamInferResponse"),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse"),
    "ModelStatistics": ("ModelStatisticsRequest", "ModelStatisticsResponse"),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse"),
    "RepositoryModelLoad": ("RepositoryModelLoadRequest", "RepositoryModelLoadResponse"),
    "RepositoryModelUnload": ("RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse"),
    "SystemSharedMemoryStatus": (
        "SystemSharedMemoryStatusRequest",
        "SystemSharedMemoryStatusResponse",
    ),
    "SystemSharedMemoryRegister": (
        "SystemSharedMemoryRegisterRequest",
        "SystemSharedMemoryRegisterResponse",
    ),
    "SystemSharedMemoryUnregister": (
        "SystemSharedMemoryUnregisterRequest",
        "SystemSharedMemoryUnregisterResponse",
    ),
    "TraceSetting": ("TraceSettingRequest", "TraceSettingResponse"),
    "LogSettings": ("LogSettingsRequest", "LogSettingsResponse"),
}

# Our own API as the server and client code against it.
CLASSIFIER_FIELDS = {
    "Tensor": {"dtype": 1, "shape": 2, "data": 3},
    "Image": {"encoded": 1, "tensor": 2},
    "PredictRequest": {"model": 1, "version": 2, "images": 3, "top_k": 4, "request_id": 5},
    "ClassScore": {"index": 1, "label": 2, "probability": 3},
    "Prediction": {"classes": 1, "ood_score": 2, "out_of_distribution": 3},
    "PredictResponse": {"model": 1, "version": 2, "predictions": 3, "request_id": 4},
    "ModelInfoRequest": {"model": 1, "version": 2},
    "InputSpec": {"name": 1, "dtype": 2, "layout": 3, "channels": 4, "height": 5, "width": 6},
    "ModelInfo": {
        "name": 1,
        "version": 2,
        "versions": 3,
        "labels": 4,
        "input": 5,
        "execution_provider": 6,
        "requested_device": 7,
        "max_batch_size": 8,
        "manifest_json": 9,
        "variants": 10,
    },
    "ExplainRequest": {
        "model": 1,
        "version": 2,
        "image": 3,
        "patch_size": 4,
        "stride": 5,
        "target_class": 6,
        "has_target_class": 7,
        "render_png": 8,
        "activation_stage": 9,
    },
    "ExplainResponse": {
        "model": 1,
        "version": 2,
        "prediction": 3,
        "heatmap": 4,
        "overlay_png": 5,
        "target_class": 6,
        "forward_passes": 7,
        "activations": 8,
    },
}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (bytecode caches left out), by relative path."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def _all_messages(file_descriptor) -> dict:
    """Message descriptors by dotted name inside the package, nested ones included."""
    found = {}
    pending = list(file_descriptor.message_types_by_name.values())
    while pending:
        message = pending.pop()
        if message.GetOptions().map_entry:  # synthesised for map<> fields, not declared
            continue
        found[message.full_name.removeprefix(file_descriptor.package + ".")] = message
        pending.extend(message.nested_types)
    return found


def _field_numbers(file_descriptor) -> dict[str, dict[str, int]]:
    return {
        name: {field.name: field.number for field in message.fields}
        for name, message in _all_messages(file_descriptor).items()
    }


def test_generated_code_matches_protos(tmp_path):
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-proto.sh"), str(tmp_path), sys.executable],
        check=True,
        cwd=REPO,
        timeout=60,
    )
    fresh, committed = _tree(tmp_path), _tree(GENERATED)
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, f"serving/proto is stale ({', '.join(stale)}): run make proto"


def test_generation_is_deterministic(tmp_path):
    for run in ("a", "b"):
        subprocess.run(
            ["bash", "scripts/gen-proto.sh", str(tmp_path / run), sys.executable],
            check=True,
            cwd=REPO,
            timeout=60,
        )
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_predict_request_round_trips():
    pixels = bytes(i % 256 for i in range(28 * 28))
    request = classifier_pb2.PredictRequest(
        model="fashion-mnist",
        version=2,
        images=[
            classifier_pb2.Image(encoded=b"\x89PNG\r\n\x1a\n"),
            classifier_pb2.Image(
                tensor=classifier_pb2.Tensor(
                    dtype=classifier_pb2.UINT8, shape=[1, 28, 28], data=pixels
                )
            ),
        ],
        top_k=3,
        request_id="r-1",
    )
    decoded = classifier_pb2.PredictRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert [image.WhichOneof("source") for image in decoded.images] == ["encoded", "tensor"]
    assert decoded.images[1].tensor.data == pixels


def test_model_infer_request_round_trips():
    request = grpc_predict_v2_pb2.ModelInferRequest(
        model_name="fashion-mnist",
        model_version="1",
        id="r-1",
        inputs=[
            grpc_predict_v2_pb2.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="UINT8", shape=[1, 1, 28, 28]
            )
        ],
        outputs=[grpc_predict_v2_pb2.ModelInferRequest.InferRequestedOutputTensor(name="probs")],
        raw_input_contents=[bytes(28 * 28)],
    )
    request.parameters["priority"].int64_param = 1
    decoded = grpc_predict_v2_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert decoded == request
    assert decoded.parameters["priority"].WhichOneof("parameter_choice") == "int64_param"


def test_stubs_and_servicers_are_generated():
    assert hasattr(classifier_pb2_grpc, "ClassifierStub")
    assert hasattr(classifier_pb2_grpc, "add_ClassifierServicer_to_server")
    assert hasattr(grpc_predict_v2_pb2_grpc, "GRPCInferenceServiceStub")
    assert hasattr(grpc_predict_v2_pb2_grpc, "add_GRPCInferenceServiceServicer_to_server")


def test_v2_messages_use_the_published_field_numbers():
    assert _field_numbers(grpc_predict_v2_pb2.DESCRIPTOR) == V2_FIELDS


def test_model_config_messages_use_tritons_field_numbers():
    assert _field_numbers(model_config_pb2.DESCRIPTOR) == MODEL_CONFIG_FIELDS


# Run by the tritonclient venv's python: every message of its service_pb2 and
# model_config_pb2 as {dotted name: {field: [number, type, repeated]}} on stdout.
TRITON_DESCRIPTORS = r"""
import json
from tritonclient.grpc import model_config_pb2, service_pb2
out = {}
def walk(m, prefix=""):
    if m.GetOptions().map_entry:
        return
    name = prefix + m.name
    out[name] = {f.name: [f.number, f.type, f.label == f.LABEL_REPEATED] for f in m.fields}
    for n in m.nested_types:
        walk(n, name + ".")
for module in (service_pb2, model_config_pb2):
    for m in module.DESCRIPTOR.message_types_by_name.values():
        walk(m)
print(json.dumps(out))
"""


@pytest.mark.slow  # the tritonclient venv (make test builds it)
def test_every_field_we_declare_is_tritons_field_by_name_number_and_type(tritonclient_python):
    out = subprocess.run(
        [tritonclient_python, "-c", TRITON_DESCRIPTORS],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = json.loads(out.stdout)
    ours = {}
    for module in (grpc_predict_v2_pb2, model_config_pb2):
        for name, message in _all_messages(module.DESCRIPTOR).items():
            ours[name] = {f.name: [f.number, f.type, f.is_repeated] for f in message.fields}
    for name, fields in ours.items():
        assert name in theirs, f"{name} is not a Triton message"
        for field, spec in fields.items():
            assert theirs[name].get(field) == spec, (name, field, spec, theirs[name].get(field))


def test_v2_raw_contents_fields_are_repeated_bytes():
    request = grpc_predict_v2_pb2.ModelInferRequest.DESCRIPTOR
    response = grpc_predict_v2_pb2.ModelInferResponse.DESCRIPTOR
    for field in (
        request.fields_by_name["raw_input_contents"],
        response.fields_by_name["raw_output_contents"],
    ):
        assert field.type == field.TYPE_BYTES
        assert field.is_repeated
    assert request.fields_by_name["raw_input_contents"].number == 7
    assert response.fields_by_name["raw_output_contents"].number == 6


def test_v2_service_is_the_published_one():
    descriptor = grpc_predict_v2_pb2.DESCRIPTOR
    assert descriptor.package == "inference"
    service = descriptor.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    methods = {
        method.name: (method.input_type.name, method.output_type.name) for method in service.methods
    }
    assert methods == V2_METHODS


def test_classifier_messages_keep_their_field_numbers():
    assert _field_numbers(classifier_pb2.DESCRIPTOR) == CLASSIFIER_FIELDS


def test_classifier_service_and_data_types():
    descriptor = classifier_pb2.DESCRIPTOR
    assert descriptor.package == "convserve.v1"
    service = descriptor.services_by_name["Classifier"]
    streaming = {
        method.name: (method.client_streaming, method.server_streaming)
        for method in service.methods
    }
    assert streaming == {
        "Predict": (False, False),
        "PredictStream": (True, True),
        "GetModelInfo": (False, False),
        "Explain": (False, False),
    }
    data_type = descriptor.enum_types_by_name["DataType"]
    assert {value.name: value.number for value in data_type.values} == {
        "DATA_TYPE_UNSPECIFIED": 0,
        "UINT8": 1,
        "FLOAT32": 2,
    }
