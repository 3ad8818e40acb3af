"""serving.client and cnn-predict against real `cnn-serve` processes on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from serving.client import AsyncClient, Client, PredictionError, Retry, predict_main
from serving.client.retry import Throttle
from tests.inprocess import serving
from tests.serving_helpers import (
    free_port,
    metric_value,
    running_server,
    start_server,
    wait_for,
)
from trainer.data import load_dataset

MODEL = "fashion-mnist"
N = 6  # test images per input kind


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """N real Fashion-MNIST test images, (N, 1, 28, 28) uint8."""
    return load_dataset("fashion-mnist").test.images[:N]


@pytest.fixture(scope="module")
def expected(model_repository, images) -> np.ndarray:
    """Their probabilities from ONNX Runtime in-process."""
    path = model_repository / MODEL / "1" / "model.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"images": images})[0]


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    with running_server(model_repository, tmp_path_factory.mktemp("client")) as s:
        yield s


def png_bytes(chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(chw[0]).save(buf, format="PNG")
    return buf.getvalue()


def input_kinds(images: np.ndarray, tmp_path) -> dict[str, list]:
    """The same images as every kind of input the client takes."""
    paths = []
    for i, x in enumerate(images):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(png_bytes(x))
        paths.append(p)
    return {
        "path": paths,
        "str path": [str(p) for p in paths],
        "bytes": [png_bytes(x) for x in images],
        "PIL": [Image.fromarray(x[0]) for x in images],
        "uint8 CHW": list(images),
        "uint8 HW": [x[0] for x in images],
        "uint8 HWC": [x.transpose(1, 2, 0) for x in images],
        "float32 CHW": [x.astype(np.float32) for x in images],
        "float32 HW": [x[0].astype(np.float32) for x in images],
        "float32 HWC": [x.transpose(1, 2, 0).astype(np.float32) for x in images],
    }


def as_arrays(preds) -> tuple[np.ndarray, np.ndarray]:
    idx = np.array([[c.index for c in p.classes] for p in preds])
    probs = np.array([[c.probability for c in p.classes] for p in preds])
    return idx, probs


def check_matches_ort(preds, expected: np.ndarray, k: int = 3) -> None:
    idx, probs = as_arrays(preds)
    want = np.argsort(-expected, axis=1, kind="stable")[:, :k]
    assert np.array_equal(idx, want)
    np.testing.assert_allclose(probs, np.take_along_axis(expected, want, 1), atol=1e-6)
    assert all(p.model == MODEL and p.version == 1 for p in preds)


# ----------------------------------------------------------------------------- predict
def test_every_input_kind_gives_the_answer_of_onnx_runtime(server, images, expected, tmp_path):
    with Client(server.target) as client:
        for kind, inputs in input_kinds(images, tmp_path).items():
            preds = client.predict(inputs, top_k=3)
            assert len(preds) == N, kind
            check_matches_ort(preds, expected)


def test_async_client_gives_the_same_answers_for_every_input_kind(
    server, images, expected, tmp_path
):
    kinds = input_kinds(images, tmp_path)

    async def main():
        async with AsyncClient(server.target) as client:
            return {k: await client.predict(v, top_k=3) for k, v in kinds.items()}

    for preds in asyncio.run(main()).values():
        check_matches_ort(preds, expected)


def test_predict_stream_answers_each_batch_in_order(server, images, expected):
    batches = [images[:1], images[1:4], images[4:]]
    with Client(server.target) as client:
        got = list(client.predict_stream(batches, top_k=3))
    assert [len(b) for b in got] == [1, 3, N - 4]
    check_matches_ort([p for b in got for p in b], expected)


def test_async_predict_stream_answers_each_batch_in_order(server, images, expected):
    async def batches():
        for i in range(N):
            yield [images[i]]

    async def main():
        async with AsyncClient(server.target) as client:
            return [b async for b in client.predict_stream(batches(), top_k=3)]

    got = asyncio.run(main())
    assert [len(b) for b in got] == [1] * N
    check_matches_ort([b[0] for b in got], expected)


def test_a_bad_request_in_a_stream_raises_prediction_error(server, images):
    with Client(server.target) as client, pytest.raises(PredictionError) as err:
        list(client.predict_stream([images[:1], [b"not an image"]]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ----------------------------------------------------------------------------- info, health
def test_model_info_describes_the_served_model(server, model_repository):
    manifest = json.loads((model_repository / MODEL / "1" / "manifest.json").read_text())
    with Client(server.target) as client:
        info = client.model_info()
    assert info["name"] == MODEL and info["version"] == 1 and info["versions"] == [1]
    assert info["labels"] == manifest["labels"] and len(info["labels"]) == 10
    assert info["input"] == {"channels": 1, "height": 28, "width": 28}
    assert info["execution_provider"] == "CPUExecutionProvider"
    assert info["manifest"]["test_accuracy"] == manifest["test_accuracy"]


def test_health_is_serving_from_both_clients(server):
    async def async_health():
        async with AsyncClient(server.target) as client:
            return await client.health(), await client.model_info()

    with Client(server.target) as client:
        assert client.health() == "SERVING"
        assert client.health("convserve.v1.Classifier") == "SERVING"
    status, info = asyncio.run(async_health())
    assert status == "SERVING" and info["name"] == MODEL


# ----------------------------------------------------------------------------- errors
def test_prediction_error_carries_the_status_code_and_the_servers_message(server):
    with Client(server.target) as client, pytest.raises(PredictionError) as err:
        client.predict([b"not an image"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a recognised image format" in err.value.details
    assert str(err.value).startswith("INVALID_ARGUMENT: ")


def test_a_deadline_shorter_than_the_work_raises_deadline_exceeded(server, images):
    many = [png_bytes(images[i % N]) for i in range(256)]
    with Client(server.target) as client, pytest.raises(PredictionError) as err:
        client.predict(many, timeout=0.005)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    async def main():
        async with AsyncClient(server.target) as client:
            await client.predict(many, timeout=0.005)

    with pytest.raises(PredictionError) as err:
        asyncio.run(main())
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class CountingRetry(Retry):
    """A Retry that records each backoff it is asked for (one per retry)."""

    waits: list = field(default_factory=list, compare=False)

    def delay(self, attempt: int) -> float:
        self.waits.append(attempt)
        return super().delay(attempt)


def test_invalid_argument_is_never_retried(server):
    retry = CountingRetry(attempts=5)
    before = metric_value(
        server.metrics(), "convserve_requests_total", method="Predict", code="INVALID_ARGUMENT"
    )
    with Client(server.target, retry=retry) as client, pytest.raises(PredictionError):
        client.predict([b"still not an image"])
    after = metric_value(
        server.metrics(), "convserve_requests_total", method="Predict", code="INVALID_ARGUMENT"
    )
    assert after - before == 1  # exactly one attempt reached the server
    assert retry.waits == []


def test_unavailable_is_retried_until_the_server_comes_up(model_repository, images, tmp_path):
    port = free_port()
    # No retry budget: this caller means to wait for the server, whatever it takes.
    retry = CountingRetry(attempts=1000, backoff_s=0.02, max_backoff_s=0.1, retry_budget=None)
    result: dict = {}

    def call():
        t0 = time.monotonic()
        with Client(f"127.0.0.1:{port}", retry=retry, timeout=60) as client:
            try:
                result["preds"] = client.predict([images[0]])
            except PredictionError as exc:
                result["error"] = exc
        result["seconds"] = time.monotonic() - t0

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)  # the client has been refused for a while when the server starts
    server = start_server(model_repository, tmp_path, "--port", str(port), wait=False)
    try:
        caller.join(60)
    finally:
        server.stop()
    assert "error" not in result, result.get("error")
    assert result["preds"][0].model == MODEL
    assert result["seconds"] >= 0.3
    assert len(retry.waits) >= 1  # it was refused, and retried


def test_waiting_for_a_server_to_come_up_does_not_throttle_the_calls_after_it(model_repository):
    """Health checks are probes: a client polling health until SERVING sees UNAVAILABLE many
    times; its calls afterwards must still be sent (the throttle counts calls, not probes)."""
    port = free_port()
    with Client(f"127.0.0.1:{port}", timeout=0.5, retry=Retry(attempts=1)) as client:
        for _ in range(15):  # nothing listens yet: more than the throttle's minimum of 10
            with pytest.raises(PredictionError):
                client.health()
        assert client.throttle.reject_probability() == 0.0

        def serving_now() -> bool:
            try:
                return client.health() == "SERVING"
            except PredictionError:  # the channel reconnects after its own backoff
                return False

        with serving(model_repository, port=port) as server:
            wait_for("SERVING", serving_now, timeout=60)
            assert client.predict([np.zeros((1, 28, 28), np.uint8)])[0].label
            assert server.value("convserve_requests_total", method="Predict", code="OK") == 1


def test_a_client_refused_by_its_server_sends_it_less_not_more(model_repository, images):
    """Adaptive throttling: a server that refuses every call (8 images against a queue of 1
    row) soon gets only a trickle of them; the caller gets RESOURCE_EXHAUSTED at once."""
    with serving(model_repository, max_queue_size=1) as s, Client(s.target) as client:
        refusals = []
        for _ in range(200):
            with pytest.raises(PredictionError) as err:
                client.predict(list(images[:8]))
            refusals.append(err.value)
        assert {e.code for e in refusals} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        local = sum("client-side throttling" in e.details for e in refusals)

        def sent() -> float:
            return s.value("convserve_requests_total", method="Predict", code="RESOURCE_EXHAUSTED")

        # The server counts a refusal just after sending it: the last one may lag a moment.
        wait_for("every sent call counted", lambda: sent() + local >= 200, every=0.01)
        assert sent() + local == 200 and sent() < 50, (sent(), local)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttling_follows_the_refusals_and_forgets_them_after_its_window():
    clock = FakeClock()
    throttle = Throttle(Retry(), clock=clock, rand=lambda: 0.999)  # sends unless p > 0.999
    for _ in range(10):
        assert throttle.admit()
        throttle.answered(grpc.StatusCode.OK)
    assert throttle.reject_probability() == 0.0
    for _ in range(90):
        throttle.admit()
        throttle.answered(grpc.StatusCode.RESOURCE_EXHAUSTED)
    # 100 requests, 10 accepted: (100 - 2 x 10) / 101
    assert throttle.reject_probability() == pytest.approx(80 / 101)
    clock.now += 121.0  # the window has passed: what was seen is forgotten
    assert throttle.reject_probability() == 0.0


def test_the_retry_budget_caps_retries_at_a_share_of_the_calls():
    throttle = Throttle(Retry(retry_budget=0.1, retry_tokens=10), rand=lambda: 1.0)
    assert sum(throttle.spend_retry() for _ in range(50)) == 10  # the bucket starts full
    for _ in range(100):  # 100 calls sent earn 10 retries
        throttle.admit()
    assert sum(throttle.spend_retry() for _ in range(50)) == 10
    unlimited = Throttle(Retry(retry_budget=None))
    assert all(unlimited.spend_retry() for _ in range(1000))


# ----------------------------------------------------------------------------- targets
def test_a_list_of_addresses_spreads_calls_round_robin(server, model_repository, images, tmp_path):
    with running_server(model_repository, tmp_path) as second:
        targets = [server.target, second.target]
        counts = [
            metric_value(s.metrics(), "convserve_requests_total", method="Predict", code="OK")
            for s in (server, second)
        ]
        with Client(targets) as client:
            client.health()
            for _ in range(20):
                assert client.predict([images[0]])[0].model == MODEL
        after = [
            metric_value(s.metrics(), "convserve_requests_total", method="Predict", code="OK")
            for s in (server, second)
        ]
    served = [a - b for a, b in zip(after, counts, strict=True)]
    assert sum(served) == 20 and min(served) >= 1  # both replicas answered


# ----------------------------------------------------------------------------- cnn-predict
@pytest.fixture(scope="module")
def image_tree(tmp_path_factory, server, images):
    """Nested folders: by_label/<label>/..., by_index/<index>/..., and one loose image."""
    root = tmp_path_factory.mktemp("tree")
    with Client(server.target) as client:
        labels = client.model_info()["labels"]
    truth = load_dataset("fashion-mnist").test.labels[:N]
    for i, (x, y) in enumerate(zip(images, truth, strict=True)):
        folder = root / "set" / ("by_label" if i % 2 else "by_index")
        folder = folder / (labels[y].replace("/", "-") if i % 2 else str(y))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(png_bytes(x))
    (root / "set" / "notes.txt").write_text("not an image")
    return root, labels


def test_cnn_predict_prints_a_table_and_the_accuracy_for_a_nested_folder(
    server, image_tree, expected, capsys
):
    root, labels = image_tree
    code = predict_main(["--server", server.target, "--batch-size", "4", str(root)])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == N  # every image once, the text file skipped
    for line in lines:
        path, label, prob = line.split("\t")[:3]
        i = int(path.rsplit("/", 1)[1].removesuffix(".png"))
        assert label == labels[int(expected[i].argmax())]
        assert float(prob) == pytest.approx(float(expected[i].max()), abs=1e-4)
    truth = load_dataset("fashion-mnist").test.labels[:N]
    correct = int((expected.argmax(1) == truth).sum())
    assert f"accuracy {correct / N:.4f} ({correct}/{N} images" in err


def test_cnn_predict_json_lines(server, image_tree, expected, capsys):
    root, labels = image_tree
    code = predict_main(["--server", server.target, "--json", "--top-k", "2", str(root / "set")])
    out, _ = capsys.readouterr()
    assert code == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == N
    for row in rows:
        i = int(row["file"].rsplit("/", 1)[1].removesuffix(".png"))
        assert row["model"] == MODEL and row["version"] == 1
        assert [c["index"] for c in row["classes"]] == list(np.argsort(-expected[i])[:2])
        assert row["classes"][0]["label"] == labels[row["classes"][0]["index"]]


def test_cnn_predict_reports_a_missing_path_and_an_unreachable_server(tmp_path, capsys):
    assert predict_main(["--server", "127.0.0.1:1", str(tmp_path / "nope.png")]) == 2
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(np.zeros((1, 28, 28), np.uint8)))
    port = free_port()
    assert predict_main(["--server", f"127.0.0.1:{port}", "--timeout", "2", str(img)]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
