"""The HTTP port, end to end on loopback: KServe V2 REST (JSON and the binary tensor extension),
convserve.v1 as REST, the error table, tokens, TLS and metrics, against servers built in this
process with real ONNX Runtime; clients nobody here wrote (tritonclient.http, curl, the
KServe SDK) as subprocesses; the try-it page in Debian's Chromium.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import ssl
import struct
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.client import Client
from tests.certs import CA
from tests.inprocess import serving
from tests.serving_helpers import free_port, metric_value, start_server, wait_for
from trainer.data import load_dataset

MODEL = "fashion-mnist"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def fashion_test():
    return load_dataset("fashion-mnist").test


@pytest.fixture(scope="module")
def ort_out(model_repository, fashion_test) -> dict[str, np.ndarray]:
    """Logits and probabilities of the first 64 test images, from ONNX Runtime in-process."""
    path = model_repository / MODEL / "1" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, probs = sess.run(["logits", "probabilities"], {"images": fashion_test.images[:64]})
    return {"logits": logits, "probabilities": probs}


@pytest.fixture(scope="module")
def server(model_repository):
    with serving(
        model_repository,
        http_port=free_port(),
        max_message_bytes=1_000_000,
        max_images_per_request=300,
    ) as s:
        yield s


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> Answer:
    host, port = url.split("//")[1].split(":")
    if context is not None:
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, int(port), context=context, timeout=30
        )
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Answer(r.status, r.headers, r.read())
    finally:
        conn.close()


def infer_json(x: np.ndarray, **doc: Any) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(x.shape),
                    "data": x.ravel().tolist(),
                }
            ],
            **doc,
        }
    ).encode()


def infer_binary(x: np.ndarray, outputs: list[dict[str, Any]]) -> tuple[bytes, dict[str, str]]:
    """A request as tritonclient.http sends one: the JSON header, then the tensor's bytes."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "datatype": "UINT8",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": outputs,
        }
    ).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def binary_outputs(a: Answer) -> dict[str, np.ndarray | list[bytes]]:
    """The binary tensor extension's answer, split by the header's binary_data_size."""
    n = int(a.headers["Inference-Header-Content-Length"])
    doc, rest = json.loads(a.body[:n]), memoryview(a.body)[n:]
    got: dict[str, np.ndarray | list[bytes]] = {}
    for o in doc["outputs"]:
        size = o["parameters"]["binary_data_size"]
        raw, rest = bytes(rest[:size]), rest[size:]
        if o["datatype"] == "FP32":
            got[o["name"]] = np.frombuffer(raw, "<f4").reshape(o["shape"])
        else:
            strings, i = [], 0
            while i < len(raw):
                (k,) = struct.unpack_from("<I", raw, i)
                strings.append(raw[i + 4 : i + 4 + k])
                i += 4 + k
            got[o["name"]] = strings
    assert not rest
    return got


def png(image_chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_chw[0]).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- V2 REST
def test_health_and_metadata_say_what_grpc_says(server):
    assert call(server.url, "GET", "/v2/health/live").json() == {"live": True}
    assert call(server.url, "GET", "/v2/health/ready").json() == {"ready": True}
    assert call(server.url, "GET", "/v2").json()["name"] == "convserve"
    meta = call(server.url, "GET", f"/v2/models/{MODEL}").json()
    assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    # the graph's two outputs, then the server's own (answered when named: test_monitor.py)
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("logits", "FP32", [-1, 10]),
        ("probabilities", "FP32", [-1, 10]),
        ("ood_score", "FP32", [-1, 1]),
        ("ood_flagged", "BOOL", [-1, 1]),
    ]
    assert call(server.url, "GET", f"/v2/models/{MODEL}/versions/1").json() == meta
    assert call(server.url, "GET", f"/v2/models/{MODEL}/versions/1/ready").status == 200
    not_ready = call(server.url, "GET", f"/v2/models/{MODEL}/versions/7/ready")
    assert not_ready.status == 503 and not_ready.json()["ready"] is False
    index = call(server.url, "POST", "/v2/repository/index", b"{}").json()
    assert index == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]


def test_json_inference_answers_what_onnx_runtime_computes(server, fashion_test, ort_out):
    x = fashion_test.images[:8]
    a = call(server.url, "POST", INFER, infer_json(x, id="r-1"))
    assert a.status == 200 and a.headers["Content-Type"].startswith("application/json")
    doc = a.json()
    assert doc["model_name"] == MODEL and doc["model_version"] == "1" and doc["id"] == "r-1"
    got = {o["name"]: np.array(o["data"], np.float32).reshape(o["shape"]) for o in doc["outputs"]}
    for name in ("logits", "probabilities"):
        np.testing.assert_allclose(got[name], ort_out[name][:8], atol=1e-6)


def test_the_binary_extension_carries_tensors_both_ways(server, fashion_test, ort_out):
    x = fashion_test.images[:32]
    outputs = [
        {"name": "probabilities", "parameters": {"binary_data": True}},
        {"name": "logits", "parameters": {"binary_data": True, "classification": 2}},
    ]
    body, headers = infer_binary(x, outputs)
    a = call(server.url, "POST", INFER, body, headers)
    assert a.status == 200 and a.headers["Content-Type"] == "application/octet-stream"
    got = binary_outputs(a)
    np.testing.assert_allclose(got["probabilities"], ort_out["probabilities"][:32], atol=1e-6)
    best = ort_out["logits"][:32].argmax(1)
    labels = json.loads((server.settings.model_repository / MODEL / "1" / "manifest.json")
                        .read_text())["labels"]  # fmt: skip
    firsts = got["logits"][::2]
    assert [s.decode().split(":", 1)[1] for s in firsts] == [f"{c}:{labels[c]}" for c in best]


def test_the_classification_extension_over_json(server, fashion_test, ort_out):
    x = fashion_test.images[:4]
    outputs = [{"name": "probabilities", "parameters": {"classification": 3}}]
    doc = call(server.url, "POST", INFER, infer_json(x, outputs=outputs)).json()
    (out,) = doc["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [4, 3]
    value, index, _ = out["data"][0].split(":", 2)
    assert int(index) == ort_out["probabilities"][0].argmax()
    assert float(value) == pytest.approx(ort_out["probabilities"][0].max(), abs=1e-6)


# ----------------------------------------------------------------------------- errors
def test_each_refusal_has_its_status_and_a_json_error(server, fashion_test):
    x = fashion_test.images[:1]
    fp32 = json.dumps(
        {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28],
                     "data": x.astype(np.float32).ravel().tolist()}]}
    ).encode()  # fmt: skip
    cases = {
        # the model's datatype only, named with the shape, as over gRPC
        (INFER, fp32): (400, "must be UINT8 with shape [-1, 1, 28, 28]"),
        ("/v2/models/nope/infer", infer_json(x)): (404, "nope"),
        (f"/v2/models/{MODEL}/versions/x1/infer", infer_json(x)): (404, "not a version"),
        (INFER, b"[[[["): (400, "not valid JSON"),
        (INFER, b"[" * 100_000 + b"]" * 100_000): (400, "not valid JSON"),
        (INFER, b'{"inputs": "images"}'): (400, "inputs must be a JSON array"),
        (INFER, infer_json(np.zeros((301, 1, 28, 28), np.uint8))): (400, "limit is 300"),
        (INFER, infer_json(x.astype(np.int64) + 300)): (400, "0..255"),
        (INFER, b"{" + b" " * 1_100_000 + b"}"): (413, "too large"),
        ("/v2/nothing/here", b""): (404, "Not Found"),
    }
    for (path, body), (status, words) in cases.items():
        a = call(server.url, "POST", path, body)
        assert a.status == status, (path, body[:60], a.body[:300])
        assert words in a.json()["error"], a.json()
    assert call(server.url, "DELETE", "/v2/health/live").status == 405


def test_binary_sizes_that_do_not_add_up_are_refused(server, fashion_test):
    x = fashion_test.images[:2]
    body, headers = infer_binary(x, [])
    for cut, words in ((1, "only"), (-1, "no input declares")):
        short = body[:-1] if cut == 1 else body + b"\0"
        a = call(server.url, "POST", INFER, short, headers)
        assert a.status == 400 and words in a.json()["error"]
    a = call(server.url, "POST", INFER, body, {"Inference-Header-Content-Length": "99999999"})
    assert a.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
tensor_docs = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["images", "x"]) | json_values,
                    "datatype": st.sampled_from(["UINT8", "FP32", "BYTES"]) | json_values,
                    "shape": st.lists(st.integers(-2, 3), max_size=5) | json_values,
                    "data": st.lists(st.integers(-1, 256), max_size=10) | json_values,
                },
                optional={"parameters": json_values},
            ),
            max_size=2,
        ),
    },
    optional={"outputs": json_values, "parameters": json_values, "id": json_values},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=tensor_docs | json_values)
def test_no_json_body_gets_a_server_error(server, doc):
    a = call(server.url, "POST", INFER, json.dumps(doc).encode())
    assert a.status in (200, 400, 404), a.body[:300]
    assert "error" in a.json() or a.status == 200


# ----------------------------------------------------------------------------- convserve.v1
def test_rest_predict_and_explain_of_a_png_agree_with_grpc(server, fashion_test):
    image = fashion_test.images[0]
    a = call(server.url, "POST", f"/v1/models/{MODEL}/predict?top_k=3", png(image))
    assert a.status == 200
    rest = a.json()["predictions"][0]["classes"]
    with Client(server.target) as client:
        (grpc_answer,) = client.predict([png(image)], 3)
    assert [c["label"] for c in rest] == [c.label for c in grpc_answer.classes]
    ex = call(
        server.url, "POST", f"/v1/models/{MODEL}/explain?activation_stage=", png(image)
    ).json()
    assert ex["prediction"]["classes"][0]["label"] == rest[0]["label"]
    assert ex["overlay_png"] and ex["heatmap"]["shape"] == [7, 7]
    info = call(server.url, "GET", f"/v1/models/{MODEL}").json()
    assert info["labels"][ex["target_class"]] == rest[0]["label"]
    assert 0 < info["test_accuracy"] <= 1
    assert call(server.url, "POST", f"/v1/models/{MODEL}/predict", b"").status == 400
    bad_k = call(server.url, "POST", f"/v1/models/{MODEL}/predict?top_k=x", png(image))
    assert bad_k.status == 400 and "top_k" in bad_k.json()["error"]


# ----------------------------------------------------------------------------- metrics
def test_http_calls_are_counted_by_method_status_and_protocol(server, fashion_test):
    before = server.value("convserve_requests_total", method="ModelInfer", protocol="http")
    ok = server.value("convserve_requests_total", method="ModelInfer", code="200")
    call(server.url, "POST", INFER, infer_json(fashion_test.images[:1]))
    call(server.url, "POST", INFER, b"{}")
    assert server.value("convserve_requests_total", method="ModelInfer", code="200") == ok + 1
    after = server.value("convserve_requests_total", method="ModelInfer", protocol="http")
    assert after == before + 2
    count = "convserve_request_duration_seconds_count"
    assert server.value(count, method="ModelInfer", protocol="http") >= 2


# ----------------------------------------------------------------------------- access
def test_tokens_guard_the_http_port_as_they_guard_grpc(model_repository, tmp_path, fashion_test):
    tokens = tmp_path / "tokens"
    tokens.write_text("all-of-it\nonly-metadata metadata\n")
    with serving(model_repository, http_port=free_port(), auth_token_file=tokens) as s:
        body = infer_json(fashion_test.images[:1])
        none = call(s.url, "POST", INFER, body)
        assert none.status == 401 and none.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = call(s.url, "POST", INFER, body, {"Authorization": "Bearer guess"})
        assert wrong.status == 401
        narrow = call(s.url, "POST", INFER, body, {"Authorization": "Bearer only-metadata"})
        assert narrow.status == 403
        assert call(s.url, "POST", INFER, body, {"Authorization": "Bearer all-of-it"}).status == 200
        meta = {"Authorization": "Bearer only-metadata"}
        assert call(s.url, "GET", f"/v2/models/{MODEL}", None, meta).status == 200
        assert call(s.url, "GET", "/v2/health/ready").status == 200  # health is open
        page = call(s.url, "GET", "/")  # static, no data: it asks for a token
        assert page.status == 200 and b"bearer token" in page.body
        assert s.value("convserve_auth_failures_total", group="inference") == 3


def test_tls_and_mutual_tls_on_the_http_port(model_repository, tmp_path, fashion_test):
    ca = CA("convserve test CA")
    cert, key = ca.issue("server").write(tmp_path / "server")
    client_cert, client_key = ca.issue("client").write(tmp_path / "client")
    ca_file = ca.write(tmp_path / "ca.pem")
    trust = ssl.create_default_context(cafile=str(ca_file))
    files = {"tls_cert": cert, "tls_key": key}
    with serving(model_repository, http_port=free_port(), **files) as s:
        url = s.url
        assert call(url, "GET", "/v2/health/ready", context=trust).status == 200
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            call(url, "GET", "/v2/health/ready")  # plaintext to a TLS port
        # Rotation: new files (another CA's certificate) serve the next handshake.
        other = CA("rotated CA")
        other.issue("server").write(tmp_path / "server")
        rotated = ssl.create_default_context(cafile=str(other.write(tmp_path / "other.pem")))
        assert call(url, "GET", "/v2/health/ready", context=rotated).status == 200
        with pytest.raises(ssl.SSLError):
            call(url, "GET", "/v2/health/ready", context=trust)
    ca.issue("server").write(tmp_path / "server")  # back to the first CA's
    with serving(model_repository, http_port=free_port(), tls_client_ca=ca_file, **files) as s:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            call(s.url, "GET", "/v2/health/ready", context=trust)  # no client certificate
        trust.load_cert_chain(client_cert, client_key)
        a = call(s.url, "POST", INFER, infer_json(fashion_test.images[:1]), context=trust)
        assert a.status == 200


def test_with_http_port_0_nothing_listens_and_no_ui_serves_no_page(model_repository):
    with serving(model_repository, http_port=0) as s:
        assert s.app is not None and s.app.http is None
    with serving(model_repository, http_port=free_port(), ui=False) as s:
        assert call(s.url, "GET", "/").status == 404
        assert call(s.url, "GET", "/v2/health/live").status == 200


# ----------------------------------------------------------------------------- processes
def test_sigterm_answers_every_admitted_http_call_and_refuses_the_rest(
    model_repository, tmp_path, fashion_test
):
    """Six 200-image calls in flight when SIGTERM comes: each is answered 200; a call after
    it finds the port closed (or, while it settles, 503 with Connection: close)."""
    port = free_port()
    s = start_server(
        model_repository, tmp_path, "--http-port", str(port), "--max-batch-size", "8",
        "--max-images-per-request", "300",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = infer_json(fashion_test.images[:200])
    with ThreadPoolExecutor(6) as pool:
        calls = [pool.submit(call, url, "POST", INFER, body) for _ in range(6)]

        def admitted() -> bool:
            text = s.metrics()
            handled = metric_value(text, "convserve_requests_total", method="ModelInfer")
            return metric_value(text, "convserve_inflight_requests") + handled == 6

        wait_for("the six calls to be admitted", admitted, every=0.01)
        assert s.stop() == 0
        for c in calls:
            a = c.result()
            assert a.status == 200 and a.json()["outputs"][0]["shape"][0] == 200
    assert "draining" in s.log()
    with pytest.raises(OSError):
        call(url, "GET", "/v2/health/live")


def test_workers_share_the_http_port(model_repository, tmp_path, fashion_test, ort_out):
    port = free_port()
    s = start_server(model_repository, tmp_path, "--workers", "2", "--http-port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        barrier = threading.Barrier(8)

        def infer(i: int) -> Answer:
            barrier.wait()  # 8 connections at once: SO_REUSEPORT spreads connections
            return call(url, "POST", INFER, infer_json(fashion_test.images[i : i + 1]))

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(infer, range(8)))
        for i, a in enumerate(answers):
            got = np.array(a.json()["outputs"][1]["data"], np.float32)
            np.testing.assert_allclose(got, ort_out["probabilities"][i], atol=1e-6)
        wait_for(
            "the parent to count the eight calls",
            lambda: metric_value(s.metrics(), "convserve_requests_total", code="200") == 8,
        )
    finally:
        assert s.stop() == 0
    assert "restarting" not in s.log()


# ----------------------------------------------------------------------------- clients
TRITON_HTTP_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.http as httpclient
x = np.load(sys.argv[2])
c = httpclient.InferenceServerClient(sys.argv[1])
assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(sys.argv[3])
inp = httpclient.InferInput("images", list(x.shape), "UINT8")
inp.set_data_from_numpy(x)  # the binary tensor extension, tritonclient's default
out = [httpclient.InferRequestedOutput("probabilities"),
       httpclient.InferRequestedOutput("logits", class_count=3)]
r = c.infer(sys.argv[3], [inp], outputs=out)
np.save(sys.argv[4], r.as_numpy("probabilities"))
refused = ""
try:
    bad = httpclient.InferInput("images", list(x.shape), "FP32")
    bad.set_data_from_numpy(x.astype(np.float32))
    c.infer(sys.argv[3], [bad])
except Exception as exc:
    refused = str(exc)
print(json.dumps({"top": [s.decode() for s in r.as_numpy("logits")[0]],
                  "meta": c.get_model_metadata(sys.argv[3]),
                  "index": c.get_model_repository_index(),
                  "refused": refused}))
"""


@pytest.mark.slow  # its own venv (make test builds it)
def test_tritonclient_http_gets_what_onnx_runtime_computes(
    server, fashion_test, ort_out, tmp_path, tritonclient_python
):
    x = fashion_test.images[:16]
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "triton_http.py"
    script.write_text(TRITON_HTTP_SCRIPT)
    address = server.url.split("//")[1]
    args = [str(script), address, str(tmp_path / "x.npy"), MODEL, str(tmp_path / "p.npy")]
    out = subprocess.run([tritonclient_python, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(
        np.load(tmp_path / "p.npy"), ort_out["probabilities"][:16], atol=1e-6
    )
    result = json.loads(out.stdout)
    assert len(result["top"]) == 3 and result["meta"]["platform"] == "onnxruntime_onnx"
    assert result["index"][0]["name"] == MODEL
    assert "[400]" in result["refused"] and "UINT8" in result["refused"]


KSERVE_SCRIPT = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

async def main(base, x_path, model, out_path):
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    x = np.load(x_path)
    ready = [await client.is_server_live(base), await client.is_server_ready(base),
             await client.is_model_ready(base, model)]
    answers = []
    for binary in (False, True):  # JSON tensors, then the binary tensor extension
        inp = InferInput(name="images", shape=list(x.shape), datatype="UINT8")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = await client.infer(base, InferRequest(model_name=model, infer_inputs=[inp]),
                                 model_name=model)
        answers.append(next(o for o in res.outputs if o.name == "probabilities").as_numpy())
    await client.close()
    np.save(out_path, np.stack(answers))
    print(json.dumps(ready))

asyncio.run(main(*sys.argv[1:5]))
"""


@pytest.mark.slow  # its own venv (make test builds it)
def test_the_kserve_sdk_rest_client_gets_what_onnx_runtime_computes(
    server, fashion_test, ort_out, tmp_path, kserve_python
):
    x = fashion_test.images[:16]
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "kserve_rest.py"
    script.write_text(KSERVE_SCRIPT)
    args = [str(script), server.url, str(tmp_path / "x.npy"), MODEL, str(tmp_path / "p.npy")]
    out = subprocess.run([kserve_python, *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [True, True, True]
    json_answer, binary_answer = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(json_answer, ort_out["probabilities"][:16], atol=1e-6)
    np.testing.assert_array_equal(binary_answer, json_answer)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_json_and_with_an_image_file(server, fashion_test, ort_out, tmp_path):
    request = tmp_path / "request.json"
    request.write_bytes(infer_json(fashion_test.images[:2]))
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-H", "Content-Type: application/json",
         "--data-binary", f"@{request}", server.url + INFER],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    outputs = {o["name"]: o for o in json.loads(out.stdout)["outputs"]}
    got = np.array(outputs["probabilities"]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, ort_out["probabilities"][:2], atol=1e-6)
    image = tmp_path / "shirt.png"
    image.write_bytes(png(fashion_test.images[0]))
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--data-binary", f"@{image}",
         f"{server.url}/v1/models/{MODEL}/predict?top_k=1"],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    (best,) = json.loads(out.stdout)["predictions"][0]["classes"]
    assert best["index"] == ort_out["probabilities"][0].argmax()


# ----------------------------------------------------------------------------- the page
@pytest.mark.slow  # headless Chromium
def test_the_page_classifies_a_dropped_test_image_without_console_errors(
    server, fashion_test, ort_out, tmp_path
):
    from playwright.sync_api import sync_playwright

    image = tmp_path / "test-image.png"
    image.write_bytes(png(fashion_test.images[0]))
    labels = call(server.url, "GET", f"/v1/models/{MODEL}").json()["labels"]
    want = labels[int(ort_out["probabilities"][0].argmax())]
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        # Selectors and functions, not strings to evaluate: the page's CSP forbids eval.
        page.wait_for_selector("#version option", state="attached")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("body[data-label]", state="attached", timeout=30_000)
        assert page.get_attribute("body", "data-label") == want
        assert page.locator(".bar.top .name").inner_text() == want
        overlay = page.locator("#overlay")
        overlay.wait_for()
        # the heatmap PNG decoded and rendered
        assert overlay.evaluate("(i) => i.complete && i.naturalWidth") > 0
        assert page.locator("#maps canvas").count() > 0
        shot = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts" / "page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        browser.close()
    assert not errors, errors
