"""OpenTelemetry tracing (serving/tracing.py), end to end: servers export over OTLP/gRPC to a
receiver built here from the official OpenTelemetry protos (opentelemetry-proto's generated
collector service, on 127.0.0.1 port 0), and the spans that arrive are checked: the caller's
parent, the call's decode / queue / compute children, the batch span's links, the
attributes; TraceSetting switching it; the clients propagating their caller's context; and
tracing off by default, importing nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import os
import re
import secrets
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from PIL import Image

from serving import tracing
from serving.client import AsyncClient, Client, predict_main
from serving.client.tracecontext import trace_metadata
from serving.proto.convserve.v1 import classifier_pb2 as cpb
from serving.proto.convserve.v1 import classifier_pb2_grpc as cpb_grpc
from serving.proto.inference import grpc_predict_v2_pb2 as pb
from serving.proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from serving.server import run as run_server
from tests.inprocess import InProcessServer, serving, settings_for
from tests.serving_helpers import ROOT, free_port, start_server, wait_for

MODEL = "fashion-mnist"
PREDICT = "convserve.v1.Classifier/Predict"
SERVER, INTERNAL = 2, 1  # OTLP span kinds
UNSET, ERROR = 0, 2  # OTLP status codes
WAIT_S = 15.0
T = TypeVar("T")


# ----------------------------------------------------------------------------- the receiver
@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str  # "" for a root
    kind: int
    start: int  # ns since the epoch
    end: int
    attributes: dict
    links: tuple[tuple[str, str], ...]  # (trace id, span id)
    status: int
    resource: dict


def _value(v) -> object:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver (what a collector's otlp receiver answers) keeping every
    span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._changed = threading.Condition()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):
        got = [
            Span(
                s.name,
                s.trace_id.hex(),
                s.span_id.hex(),
                s.parent_span_id.hex(),
                s.kind,
                s.start_time_unix_nano,
                s.end_time_unix_nano,
                _attrs(s.attributes),
                tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                s.status.code,
                _attrs(rs.resource.attributes),
            )
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]
        with self._changed:
            self.spans += got
            self._changed.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait(self, what: str, found: Callable[[list[Span]], T]) -> T:
        """Until `found(spans)` is truthy (its value), or fail after WAIT_S."""
        result: T | None = None

        def check() -> bool:
            nonlocal result
            result = found(list(self.spans))
            return bool(result)

        with self._changed:
            if not self._changed.wait_for(check, WAIT_S):
                pytest.fail(f"no {what} after {WAIT_S}s; received {len(self.spans)} spans")
        assert result
        return result

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in list(self.spans) if s.trace_id == trace_id]

    def span(self, span_id: str) -> Span:
        found = self.wait(
            f"span {span_id}", lambda ss: next((s for s in ss if s.span_id == span_id), None)
        )
        assert found is not None  # wait() fails first
        return found


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.server.start()
    yield r
    r.server.stop(0)


def otel_env(receiver: Receiver, **more: str) -> dict[str, str]:
    """Tracing on, exported to `receiver` every 50 ms."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **more,
    }


def traced_server(model_repository, receiver: Receiver, **settings) -> InProcessServer:
    """An in-process server started with the OTEL_* variables set (the SDK reads them while
    the server is built; the test process keeps its own environment)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in otel_env(receiver).items():
            mp.setenv(key, value)
        return InProcessServer(settings_for(model_repository, poll_interval=0, **settings)).start()


@pytest.fixture(scope="module")
def server(model_repository, receiver) -> Iterator[InProcessServer]:
    s = traced_server(model_repository, receiver, http_port=free_port())
    yield s
    s.stop()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (32, 1, 28, 28), dtype=np.uint8)


def traceparent() -> tuple[str, str, str]:
    """(header value, trace id, span id) of a sampled caller."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def predict_request(x: np.ndarray) -> cpb.PredictRequest:
    return cpb.PredictRequest(
        model=MODEL,
        images=[
            cpb.Image(tensor=cpb.Tensor(dtype=cpb.UINT8, shape=[1, 28, 28], data=i.tobytes()))
            for i in x
        ],
    )


def infer_request(x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="images", datatype="UINT8", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[0]).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Call:
    span: Span
    decode: Span
    queue: Span
    compute: list[Span]


def call_spans(receiver: Receiver, trace_id: str, name: str, computes: int = 1) -> Call:
    """The call span `name` of a trace and its children, once all have arrived; checks the
    children are exactly decode, queue and `computes` compute spans, in time order."""

    def complete(spans: list[Span]) -> Call | None:
        mine = [s for s in spans if s.trace_id == trace_id]
        calls = [s for s in mine if s.name == name]
        if len(calls) != 1:
            return None
        kids = [s for s in mine if s.parent == calls[0].span_id]
        if len(kids) < 2 + computes:
            return None
        by = {n: [s for s in kids if s.name == n] for n in ("decode", "queue", "compute")}
        assert sorted(s.name for s in kids) == ["compute"] * computes + ["decode", "queue"]
        return Call(calls[0], by["decode"][0], by["queue"][0], by["compute"])

    c = receiver.wait(f"{name} with its children in trace {trace_id}", complete)
    assert c is not None
    s, d, q = c.span, c.decode, c.queue
    assert s.kind == SERVER
    assert s.start <= d.start <= d.end == q.start <= q.end
    for compute in c.compute:
        assert q.end <= compute.start <= compute.end <= s.end
    return c


def check_model_attributes(attributes: dict) -> None:
    assert attributes[tracing.MODEL] == MODEL
    assert attributes[tracing.VERSION] == 1
    assert attributes[tracing.PROVIDER] == "CPUExecutionProvider"


def batch_of(receiver: Receiver, compute: Span) -> Span:
    """The batch span a compute span links to; it links back to the call."""
    ((trace_id, span_id),) = compute.links
    batch = receiver.span(span_id)
    assert batch.name == "batch" and batch.trace_id == trace_id and batch.parent == ""
    check_model_attributes(batch.attributes)
    return batch


# ----------------------------------------------------------------------------- the spans
def test_a_predict_is_a_span_under_its_callers_with_decode_queue_and_compute(
    server, receiver, images
):
    header, trace_id, parent = traceparent()
    with server.channel() as ch:
        cpb_grpc.ClassifierStub(ch).Predict(
            predict_request(images[:1]), metadata=[("traceparent", header)], timeout=30
        )
    c = call_spans(receiver, trace_id, PREDICT)
    assert c.span.parent == parent
    a = c.span.attributes
    assert a["rpc.system"] == "grpc" and a["rpc.service"] == "convserve.v1.Classifier"
    assert a["rpc.method"] == "Predict" and a["rpc.grpc.status_code"] == 0
    assert a[tracing.IMAGES] == 1 and c.span.status == UNSET
    check_model_attributes(a)
    assert c.span.resource["service.name"] == "convserve"
    batch = batch_of(receiver, c.compute[0])
    assert (trace_id, c.span.span_id) in batch.links
    assert (
        batch.attributes[tracing.BATCH_SIZE] == 1
        and c.compute[0].attributes[tracing.BATCH_SIZE] == 1
    )
    assert (batch.start, batch.end) == (c.compute[0].start, c.compute[0].end)


def test_each_message_of_a_stream_is_a_call_of_its_own(server, receiver, images):
    header, trace_id, parent = traceparent()
    with server.channel() as ch:
        stream = cpb_grpc.ClassifierStub(ch).PredictStream(
            iter([predict_request(images[:1]), predict_request(images[1:3])]),
            metadata=[("traceparent", header)],
            timeout=30,
        )
        assert len(list(stream)) == 2

    def both(_: list[Span]) -> list[Span] | None:
        calls = [s for s in receiver.trace(trace_id) if s.name.endswith("/PredictStream")]
        return calls if len(calls) == 2 else None

    calls = receiver.wait("a span per message", both)
    assert all(c.parent == parent for c in calls)
    assert sorted(c.attributes[tracing.IMAGES] for c in calls) == [1, 2]

    def steps(call: Span) -> list[str]:
        return sorted(s.name for s in receiver.trace(trace_id) if s.parent == call.span_id)

    for c in calls:
        receiver.wait("its steps", lambda _, c=c: steps(c) == ["compute", "decode", "queue"])


def test_a_32_image_predict_runs_as_one_batch_of_32(server, receiver, images):
    header, trace_id, _ = traceparent()
    with server.channel() as ch:
        cpb_grpc.ClassifierStub(ch).Predict(
            predict_request(images), metadata=[("traceparent", header)], timeout=30
        )
    c = call_spans(receiver, trace_id, PREDICT)
    assert c.span.attributes[tracing.IMAGES] == 32
    batch = batch_of(receiver, c.compute[0])
    assert batch.attributes[tracing.BATCH_SIZE] == 32
    assert batch.attributes[tracing.BATCH_REQUESTS] == 1


def test_a_v2_model_infer_is_traced_the_same_way(server, receiver, images):
    header, trace_id, parent = traceparent()
    with server.channel() as ch:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            infer_request(images[:3]), metadata=[("traceparent", header)], timeout=30
        )
    c = call_spans(receiver, trace_id, "inference.GRPCInferenceService/ModelInfer")
    assert c.span.parent == parent and c.span.attributes[tracing.IMAGES] == 3
    check_model_attributes(c.span.attributes)
    assert batch_of(receiver, c.compute[0]).attributes[tracing.BATCH_SIZE] == 3


def test_an_http_call_takes_its_callers_traceparent_header(server, receiver, images):
    header, trace_id, parent = traceparent()
    url = f"{server.url}/v1/models/{MODEL}/predict?top_k=2"
    request = urllib.request.Request(url, data=png(images[0]), headers={"traceparent": header})
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.status == 200
    c = call_spans(receiver, trace_id, "POST /v1/models/{model}/predict")
    a = c.span.attributes
    assert c.span.parent == parent
    assert a["http.request.method"] == "POST" and a["http.route"] == "/v1/models/{model}/predict"
    assert a["url.path"] == f"/v1/models/{MODEL}/predict" and a["rpc.method"] == "Predict"
    assert a["http.response.status_code"] == 200
    check_model_attributes(a)


def test_a_batch_span_links_every_call_it_served(model_repository, receiver, images):
    # A queue delay holds the first call until the others arrive: one batch serves several.
    s = traced_server(model_repository, receiver, max_queue_delay_us=100_000)
    try:
        calls = [traceparent() for _ in range(6)]
        with s.channel() as ch:
            stub = cpb_grpc.ClassifierStub(ch)
            futures = [
                stub.Predict.future(
                    predict_request(images[i : i + 1]), metadata=[("traceparent", h)], timeout=30
                )
                for i, (h, _, _) in enumerate(calls)
            ]
            for f in futures:
                f.result()
    finally:
        s.stop()
    spans = {t: call_spans(receiver, t, PREDICT) for _, t, _ in calls}
    batches = {}
    for trace_id, c in spans.items():
        batch = batch_of(receiver, c.compute[0])
        assert (trace_id, c.span.span_id) in batch.links
        batches[batch.span_id] = batch
    assert any(len(b.links) > 1 for b in batches.values())
    for b in batches.values():
        # every call here is traced and sends one image: as many links as rows and requests
        assert (
            b.attributes[tracing.BATCH_SIZE] == b.attributes[tracing.BATCH_REQUESTS] == len(b.links)
        )
        served = {(t, c.span.span_id) for t, c in spans.items()}
        assert set(b.links) <= served


def test_a_calls_status_code_is_recorded_and_a_server_error_marks_the_span(server, receiver):
    header, trace_id, _ = traceparent()
    with server.channel() as ch, pytest.raises(grpc.RpcError) as err:
        cpb_grpc.ClassifierStub(ch).Predict(
            cpb.PredictRequest(model="nope"), metadata=[("traceparent", header)], timeout=30
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    (refused,) = receiver.wait(PREDICT, lambda _: receiver.trace(trace_id))
    assert refused.attributes["rpc.grpc.status_code"] == 5 and refused.status == UNSET
    # INTERNAL is the server's fault: the span says ERROR (semantic conventions for RPC)
    header, trace_id, _ = traceparent()
    call = server.app.plane.tracing.call("probe", {"traceparent": header}, {})
    call.end_rpc(grpc.StatusCode.INTERNAL.value[0])
    (failed,) = receiver.wait("probe", lambda _: receiver.trace(trace_id))
    assert failed.status == ERROR and failed.attributes["rpc.grpc.status_code"] == 13


# ----------------------------------------------------------------------------- TraceSetting
def trace_setting(stub, model: str = "", **changes: list[str]) -> dict[str, list[str]]:
    req = pb.TraceSettingRequest(model_name=model)
    for key, values in changes.items():
        req.settings[key].value.extend(values)
    return {k: list(v.value) for k, v in stub.TraceSetting(req).settings.items()}


def test_trace_setting_reports_tracing_and_switches_it_off_and_on(server, receiver, images):
    with server.channel() as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        got = trace_setting(stub)
        assert got["trace_level"] == ["TIMESTAMPS"] and got["trace_rate"] == ["1"]
        assert got["trace_mode"] == ["opentelemetry"] and got["exporter"] == ["otlp"]
        assert got["trace_count"] == ["-1"]
        off, off_trace, _ = traceparent()
        assert trace_setting(stub, trace_level=["OFF"])["trace_level"] == ["OFF"]
        infer = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        infer(infer_request(images[:1]), metadata=[("traceparent", off)], timeout=30)
        # an empty value returns a setting to how the server started: TIMESTAMPS
        assert trace_setting(stub, trace_level=[])["trace_level"] == ["TIMESTAMPS"]
        on, on_trace, _ = traceparent()
        infer(infer_request(images[:1]), metadata=[("traceparent", on)], timeout=30)
    call_spans(receiver, on_trace, "inference.GRPCInferenceService/ModelInfer")
    # spans are exported in the order they end: the call made while OFF left none
    assert not receiver.trace(off_trace)


def test_trace_rate_samples_one_call_in_n_of_those_whose_caller_did_not_decide(server):
    t = server.app.plane.tracing
    with server.channel() as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        got = trace_setting(stub, trace_rate=["1000000000"])
        assert got["trace_rate"] == ["1000000000"] and "TraceIdRatioBased" in got["sampler"][0]
        assert all(t.call("root", {}, {}) is None for _ in range(50))
        header, _, _ = traceparent()  # a caller that sampled its call is still traced
        sampled = t.call("child", {"traceparent": header}, {})
        assert sampled is not None
        sampled.end_rpc(0)
        assert trace_setting(stub, trace_rate=[])["trace_rate"] == ["1"]
    root = t.call("root", {}, {})
    assert root is not None
    root.end_rpc(0)


@pytest.mark.parametrize(
    "model, changes",
    [
        ("", {"trace_level": ["TENSORS"]}),
        ("", {"trace_level": ["LOUD"]}),
        ("", {"trace_rate": ["often"]}),
        ("", {"trace_count": ["5"]}),
        ("", {"trace_file": ["/tmp/trace.json"]}),
        ("", {"trace_mode": ["triton"]}),
        ("", {"colour": ["blue"]}),
        (MODEL, {"trace_level": ["OFF"]}),
    ],
)
def test_trace_setting_refuses_what_it_cannot_do_and_changes_nothing(server, model, changes):
    with server.channel() as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        before = trace_setting(stub)
        with pytest.raises(grpc.RpcError) as err:
            trace_setting(stub, model, **{"trace_rate": ["7"], **changes})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trace_setting(stub) == before


# ----------------------------------------------------------------------------- clients
def test_the_clients_send_their_callers_context(server, receiver, images):
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")
    assert trace_metadata() == ()  # no span current: nothing is sent
    with tracer.start_as_current_span("caller") as caller:
        ctx = caller.get_span_context()
        with Client(server.target) as client:
            client.predict([images[0]])

        async def from_asyncio() -> None:
            async with AsyncClient(server.target) as aclient:
                await aclient.predict([images[1]])

        asyncio.run(from_asyncio())
    trace_id, parent = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
    calls = receiver.wait(
        "both clients' calls",
        lambda _: len([s for s in receiver.trace(trace_id) if s.name == PREDICT]) == 2,
    )
    assert calls and all(s.parent == parent for s in receiver.trace(trace_id) if s.name == PREDICT)


def test_cnn_predict_runs_in_the_trace_its_environment_names(server, receiver, images, tmp_path):
    (tmp_path / "shirt.png").write_bytes(png(images[0]))
    header, trace_id, parent = traceparent()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in otel_env(receiver, TRACEPARENT=header).items():
            mp.setenv(key, value)
        argv = ["--server", server.target, "--no-progress", str(tmp_path / "shirt.png")]
        assert predict_main(argv) == 0

    def complete(_: list[Span]) -> dict[str, Span] | None:
        names = {s.name: s for s in receiver.trace(trace_id)}
        return names if {"cnn-predict", PREDICT} <= set(names) else None

    spans = receiver.wait("cnn-predict's span and its calls", complete)
    assert spans is not None
    command = spans["cnn-predict"]
    assert command.parent == parent and command.resource["service.name"] == "cnn-predict"
    assert spans[PREDICT].parent == command.span_id
    assert spans["convserve.v1.Classifier/GetModelInfo"].parent == command.span_id


# ----------------------------------------------------------------------------- off, and setup
def test_tracing_is_off_by_default_and_imports_nothing(model_repository):
    with serving(model_repository) as s:
        assert s.app.plane.tracing is None
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = (
        "import sys\n"
        "import serving.server, serving.client, serving.main\n"
        "from serving.tracing import tracing_from_environ\n"
        "assert tracing_from_environ() is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "environ, on",
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, True),
    ],
)
def test_the_standard_variables_turn_tracing_on(environ, on):
    assert tracing.TracingConfig.from_environ(environ).on is on


@pytest.mark.parametrize(
    "environ, named",
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "PROTOCOL"),
    ],
)
def test_a_server_asked_for_what_it_cannot_export_does_not_start(
    model_repository, monkeypatch, caplog, environ, named
):
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    assert run_server(settings_for(model_repository)) == 3
    assert named in caplog.text


def test_each_worker_exports_its_spans_and_flushes_them_when_stopped(
    model_repository, receiver, images, tmp_path
):
    # A minute between exports: what arrives was flushed by the drain.
    env = otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000")
    server = start_server(model_repository, tmp_path, "--workers", "2", env=env, timeout=90)
    try:  # health answers once one worker listens; the other may still be warming up
        wait_for("both workers listening", lambda: server.log().count("listening on") == 2, 60)
        traces = [traceparent() for _ in range(16)]
        for header, _, _ in traces:  # a channel each: SO_REUSEPORT spreads connections
            with server.channel() as ch:
                cpb_grpc.ClassifierStub(ch).Predict(
                    predict_request(images[:1]), metadata=[("traceparent", header)], timeout=30
                )
    finally:
        assert server.stop() == 0, server.log()
    for _, trace_id, _ in traces:
        call_spans(receiver, trace_id, PREDICT)
    pids = {s.resource["process.pid"] for _, t, _ in traces for s in receiver.trace(t)}
    started = re.search(r"started 2 workers on port \d+: \[(\d+), (\d+)\]", server.log())
    assert started, server.log()
    assert pids == {int(started[1]), int(started[2])}  # 16 connections reached both (1 - 2^-15)
