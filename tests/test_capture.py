"""Sampled captures (`--capture-dir`, serving.capture): a sample of the answered images written
as PNGs in imagefolder layout by predicted class, each with a JSON line, off the request path.

Real servers on loopback (in-process on port 0 where a process is not the point), real ONNX
Runtime, tiny models whose answers are known (tests/tiny_models.py): the image the model saw
comes back pixel for pixel in the folder of the class it predicted; every sampled image is
captured or dropped and counted; a full disk (RLIMIT_FSIZE) and a writer that falls behind
fail no request; the byte budget deletes the oldest first, across restarts and per worker;
and `cnn-train` trains on the folder as it is.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import threading
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from serving.capture import WRITER_THREAD, Capture, CaptureConfig, label_folder
from serving.metrics import Metrics
from serving.options import SettingsError
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from serving.proto.inference import grpc_predict_v2_pb2 as v2
from serving.proto.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from serving.settings import ServerSettings, server_settings
from tests.inprocess import InProcessServer, serving
from tests.serving_helpers import (
    ROOT,
    ServerProcess,
    free_port,
    metric_value,
    running_server,
    wait_for,
    wait_serving,
)
from tests.tiny_models import DEFAULT_LABELS, write_version

GRAY, RGB, BIG = (1, 16, 16), (3, 16, 16), (3, 64, 64)
CAPTURED = "convserve_captured_images_total"
DROPPED = "convserve_capture_dropped_images_total"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """Tiny models (class = round(mean pixel * 3)): greyscale and colour 16x16, and a colour
    64x64 whose PNGs are larger than a few KiB."""
    root = tmp_path_factory.mktemp("capture-models")
    for name, shape in (("gray", GRAY), ("rgb", RGB), ("big", BIG)):
        write_version(root, name, 1, shape=shape)
    return root


def image(k: int, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A noisy uint8 image of class k (the noise keeps each PNG distinct and not tiny)."""
    level = round(255 * k / (len(DEFAULT_LABELS) - 1))
    return np.clip(level + rng.integers(-20, 21, size=shape), 0, 255).astype(np.uint8)


def tensor(img: np.ndarray) -> pb.Image:
    return pb.Image(tensor=pb.Tensor(dtype=pb.UINT8, shape=list(img.shape), data=img.tobytes()))


def predict(model: str, images: list[np.ndarray], request_id: str = "") -> pb.PredictRequest:
    return pb.PredictRequest(model=model, images=[tensor(i) for i in images], request_id=request_id)


def lines_in(folder: Path, worker: str = "w") -> list[dict]:
    """Every JSON line (of one worker's files, `w0`, or of all), oldest file first."""
    files = folder.glob(f"captures-{worker}*.jsonl")
    ordered = sorted(files, key=lambda p: int(p.stem.split("-")[-1]))
    return [json.loads(line) for f in ordered for line in f.read_text().splitlines()]


def pngs_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/*.png"))


def accounted(server: InProcessServer) -> float:
    return server.value(CAPTURED) + server.value(DROPPED)


def wait_accounted(server: InProcessServer, n: int) -> None:
    wait_for(f"{n} images captured or dropped", lambda: accounted(server) >= n, every=0.02)
    assert accounted(server) == n


def post(url: str, body: bytes) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, body), timeout=10) as r:
        assert r.status == 200


def png_of(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[0]).save(buf, format="PNG")
    return buf.getvalue()


def pixels(path: Path) -> tuple[str, np.ndarray]:
    """A PNG's mode and its pixels as (C, H, W)."""
    with Image.open(path) as im:
        a = np.asarray(im)
        return im.mode, a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- settings
def test_captures_are_off_by_default_and_a_rate_needs_a_folder_and_a_fraction(capsys):
    assert server_settings([], environ={}).capture is None
    env = {"CONVSERVE_CAPTURE_DIR": "/data/captures", "CONVSERVE_CAPTURE_RATE": "0.25"}
    c = server_settings(["--capture-max-bytes", "1000"], environ=env).capture
    assert (c.folder, c.rate, c.max_bytes, c.worker) == (Path("/data/captures"), 0.25, 1000, 0)
    defaults = ServerSettings(capture_dir="/c").capture
    assert (defaults.rate, defaults.max_bytes) == (0.01, 1 << 30)
    assert ServerSettings(capture_dir="/c", capture_rate=0).capture is None  # 0 pauses
    # Worker 1 of 4 (serving.workers sets these): its own prefix, a quarter of the budget.
    w = ServerSettings(capture_dir="/c", capture_max_bytes=1000, worker_index=1, worker_count=4)
    assert (w.capture.worker, w.capture.max_bytes) == (1, 250)
    for argv, says in (
        (["--capture-rate", "0.5"], "--capture-rate and --capture-max-bytes need --capture-dir"),
        (["--capture-dir", "/c", "--capture-rate", "1.5"], "--capture-rate must be within 0..1"),
        (["--capture-dir", "/c", "--capture-rate", "-1"], "--capture-rate must be >= 0"),
        (["--capture-dir", "/c", "--capture-max-bytes", "0"], "--capture-max-bytes must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            server_settings(argv, environ={})
        assert says in capsys.readouterr().err
    with pytest.raises(SettingsError, match=r"within 0\.\.1"):
        ServerSettings(capture_dir="/c", capture_rate=float("nan"))


def test_a_label_becomes_a_folder_name_that_stays_inside_the_capture_folder():
    assert label_folder("T-shirt/top", 0) == "T-shirt_top-0"
    assert label_folder("Sandal", 5) == "Sandal"
    unsafe = ["..", ".", "", "../../etc", ".hidden", "a\\b", "nul\x00", " ", "é" * 300, "\ud800"]
    names = [label_folder(label, i) for i, label in enumerate(unsafe)]
    assert len(set(names)) == len(names)  # two unsafe labels never share a folder
    for name in names:
        assert name and not name.startswith(".") and "/" not in name and "\\" not in name
        assert "\x00" not in name and len(name.encode()) < 255
        assert Path("/captures", name).resolve().parent == Path("/captures")


def test_a_capture_folder_that_cannot_be_made_stops_start_up(repo, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(FileExistsError), serving(repo, capture_dir=taken):
        pass


# ----------------------------------------------------------------------------- what is written
def test_at_rate_1_every_answered_image_is_captured_as_the_png_the_model_saw(repo, tmp_path):
    """Predict (one and several images, with and without a request id) and ModelInfer, over
    gRPC and HTTP, greyscale and colour: each image once, in the folder of its predicted
    class, pixel for pixel, with a JSON line; files, lines and metrics agree."""
    folder = tmp_path / "captures"
    rng = np.random.default_rng(0)
    sent: dict[tuple[str, int], np.ndarray] = {}  # (request id, index) -> image
    t0 = datetime.now(UTC)
    settings = {"capture_dir": folder, "capture_rate": 1.0, "http_port": free_port()}
    with serving(repo, **settings) as server, server.channel() as ch:
        predictor, inference = pb_grpc.ClassifierStub(ch), v2_grpc.GRPCInferenceServiceStub(ch)
        for j in range(240):
            model, shape = ("gray", GRAY) if j % 2 else ("rgb", RGB)
            images = [image((j + i) % 4, shape, rng) for i in range(3 if j % 10 == 0 else 1)]
            rid = "" if j % 7 == 0 else f"r{j}"
            predictor.Predict(predict(model, images, rid))
            sent.update({(rid, i): img for i, img in enumerate(images) if rid})
        for j in range(10):  # KServe V2: the same core, so the same captures
            images = np.stack([image(j % 4, GRAY, rng) for _ in range(2)])
            inference.ModelInfer(
                v2.ModelInferRequest(
                    model_name="gray",
                    id=f"v2-{j}",
                    inputs=[v2.ModelInferRequest.InferInputTensor(
                        name="images", datatype="UINT8", shape=list(images.shape)
                    )],
                    raw_input_contents=[images.tobytes()],
                )
            )  # fmt: skip
            sent.update({(f"v2-{j}", i): img for i, img in enumerate(images)})
        for j in range(2):  # HTTP: KServe V2 REST, and an image file to /v1/.../predict
            img = image(j, GRAY, rng)
            doc = {"id": f"http-{j}", "inputs": [{"name": "images", "datatype": "UINT8",
                   "shape": [1, *GRAY], "data": img.ravel().tolist()}]}  # fmt: skip
            post(f"{server.url}/v2/models/gray/infer", json.dumps(doc).encode())
            post(f"{server.url}/v1/models/gray/predict", png_of(img))
            sent[f"http-{j}", 0] = img
        n = 240 + 24 * 2 + 10 * 2 + 4  # every tenth Predict had 3 images
        wait_accounted(server, n)
        assert WRITER_THREAD in {t.name for t in threading.enumerate()}
        assert server.value(CAPTURED) == n and server.value(DROPPED) == 0
        assert server.value("convserve_capture_bytes") == sum(
            p.stat().st_size for p in folder.rglob("*") if p.is_file()
        )
    assert WRITER_THREAD not in {t.name for t in threading.enumerate()}  # drained and stopped
    lines, pngs = lines_in(folder), pngs_in(folder)
    assert len(lines) == len(pngs) == n
    assert sorted(folder / line["file"] for line in lines) == pngs
    for line in lines:
        mode, got = pixels(folder / line["file"])
        best = line["classes"][0]
        assert line["file"].split("/")[0] == best["label"] == DEFAULT_LABELS[best["index"]]
        assert [c["probability"] for c in line["classes"]] == sorted(
            (c["probability"] for c in line["classes"]), reverse=True
        )
        assert line["version"] == 1 and t0 <= datetime.fromisoformat(line["time"])
        assert mode == ("L" if line["model"] == "gray" else "RGB")
        if (line["request_id"], line["index"]) in sent:
            expected = sent[line["request_id"], line["index"]]
            assert np.array_equal(got, expected)
            assert best["index"] == round(expected.mean() / 255 * 3)
        else:  # no request id: one is made up, shared by the request's images
            assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"])
    assert len({ln["request_id"] for ln in lines}) == 240 + 10 + 4  # one id per request
    # The images callers sent are the server user's only; nothing half-written is left.
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in [*pngs, *folder.glob("*.jsonl")]} == {0o600}
    assert not [p for p in folder.rglob(".*")]


def test_at_concurrency_64_no_request_fails_and_captured_plus_dropped_is_every_image(
    repo, tmp_path
):
    """A writer that cannot keep up (a queue of 8 images, requests of up to 16): the excess
    is dropped and counted as queue_full, never waited for."""
    folder, rng = tmp_path / "captures", np.random.default_rng(1)
    requests = [
        [image(k % 4, GRAY, rng) for _ in range(16 if k % 8 == 0 else 1)] for k in range(640)
    ]
    n = sum(map(len, requests))

    async def send(target: str) -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.ClassifierStub(ch)

            async def client(c: int) -> list[grpc.StatusCode]:
                codes = []
                for images in requests[c::64]:
                    try:
                        await stub.Predict(predict("gray", images), timeout=30)
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                return codes

            return [
                code for codes in await asyncio.gather(*map(client, range(64))) for code in codes
            ]

    with serving(repo, capture_dir=folder, capture_rate=1.0, capture_queue=8) as server:
        codes = asyncio.run(send(server.target))
        assert codes == [grpc.StatusCode.OK] * len(requests)
        wait_accounted(server, n)
        captured = server.value(CAPTURED)
        assert server.value(DROPPED, reason="queue_full") == n - captured
        assert server.value(DROPPED, reason="queue_full") >= 8 * 80  # each 16-image request
    assert len(lines_in(folder)) == len(pngs_in(folder)) == captured > 0


def test_images_still_queued_when_the_flush_time_runs_out_are_counted_as_shutdown(tmp_path):
    registry = CollectorRegistry()
    config = CaptureConfig(tmp_path / "captures", 1.0, 1 << 30, 1000, 0)
    capture = Capture(config, Metrics(registry))
    rows = image(1, GRAY, np.random.default_rng(6))[None].repeat(500, axis=0)
    probabilities = np.full((500, 4), 0.25, dtype=np.float32)
    capture.start()
    capture.offer("gray", 1, DEFAULT_LABELS, rows, probabilities, "r")
    asyncio.run(capture.drain(timeout=0))  # no time to write them all
    capture.offer("gray", 1, DEFAULT_LABELS, rows[:7], probabilities[:7], "late")

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": "gray", **labels}) or 0.0

    shutdown = lambda: value(DROPPED, reason="shutdown")  # noqa: E731
    wait_for("507 images", lambda: value(CAPTURED) + shutdown() == 507, every=0.02)
    assert shutdown() >= 7  # at least those offered after the drain
    assert len(pngs_in(config.folder)) == len(lines_in(config.folder)) == value(CAPTURED)


# ----------------------------------------------------------------------------- a full disk
# A server whose files may not grow past FSIZE bytes (SIGXFSZ ignored, so a write past it
# fails with EFBIG, as on a full disk): PNGs of `gray` fit, those of `big` do not, and the
# JSONL file fills up after a few lines.
FSIZE = 4096
LIMITED = (
    "import resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FSIZE}, resource.RLIM_INFINITY))\n"
    "from serving.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def copy_lines(stream: Any, path: Path) -> None:
    with open(path, "w") as out:
        for line in stream:
            out.write(line)
            out.flush()


def test_a_full_disk_drops_and_counts_captures_and_fails_no_request(repo, tmp_path):
    folder, rng = tmp_path / "captures", np.random.default_rng(2)
    port, mport, log_path = free_port(), free_port(), tmp_path / "server.log"
    flags = ["--model-repository", str(repo), "--host", "127.0.0.1", "--port", str(port)]
    flags += ["--metrics-host", "127.0.0.1", "--metrics-port", str(mport), "--poll-interval", "0"]
    flags += ["--capture-dir", str(folder), "--capture-rate", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", LIMITED, *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # Its log through a pipe, written here: a log file of its own would stop at FSIZE too.
    copier = threading.Thread(target=copy_lines, args=(proc.stdout, log_path), daemon=True)
    copier.start()
    server = ServerProcess(proc, port, mport, log_path)
    try:
        wait_serving(server)
        with server.channel() as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for j in range(60):
                model, shape = ("big", BIG) if j % 3 == 0 else ("gray", GRAY)
                stub.Predict(predict(model, [image(j % 4, shape, rng)]))  # raises if it fails
        metrics = lambda: server.metrics()  # noqa: E731
        wait_for(
            "60 images captured or dropped",
            lambda: metric_value(metrics(), CAPTURED) + metric_value(metrics(), DROPPED) == 60,
        )
        text = metrics()
        assert metric_value(text, "convserve_requests_total", method="Predict", code="OK") == 60
    finally:
        assert server.stop() == 0, server.log()
        copier.join(10)
    captured = metric_value(text, CAPTURED)
    assert metric_value(text, DROPPED) == metric_value(text, DROPPED, reason="write_error")
    assert metric_value(text, DROPPED, model="big") == 20  # every big PNG was too big
    assert 0 < captured < 40  # some gray ones fitted before the JSONL file was full
    # What is there is whole: an image for each line, a line for each image, no temp files.
    lines = lines_in(folder)
    assert len(lines) == len(pngs_in(folder)) == captured
    assert sorted(folder / line["file"] for line in lines) == pngs_in(folder)
    assert not [p for p in folder.rglob(".*")]
    log = server.log()
    assert log.count("capture not written") == 1, log  # once per minute, however many fail
    assert "File too large" in log and "Traceback" not in log, log


# ----------------------------------------------------------------------------- the budget
def test_the_byte_budget_deletes_the_oldest_first_and_counts_what_earlier_runs_left(repo, tmp_path):
    folder, rng, budget = tmp_path / "captures", np.random.default_rng(3), 12_000
    other = folder / "dark" / "w1-1.png"  # another worker's file: never ours to delete
    sent = []

    def capture(server: InProcessServer, prefix: str, count: int) -> None:
        with server.channel() as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for j in range(count):
                stub.Predict(predict("gray", [image(j % 4, GRAY, rng)], f"{prefix}{j:03d}"))
                sent.append(f"{prefix}{j:03d}")
        wait_accounted(server, count)

    def kept() -> list[str]:
        """Request ids of the images still there, oldest first; every one has its line."""
        on_disk = {p.relative_to(folder).as_posix() for p in pngs_in(folder)} - {"dark/w1-1.png"}
        described = {ln["file"]: ln["request_id"] for ln in lines_in(folder)}
        assert on_disk <= set(described)
        return sorted((described[f] for f in on_disk), key=sent.index)

    def our_bytes() -> int:
        return sum(p.stat().st_size for p in folder.rglob("w0-*")) + sum(
            p.stat().st_size for p in folder.glob("captures-w0-*.jsonl")
        )

    settings = {"capture_dir": folder, "capture_rate": 1.0, "capture_max_bytes": budget}
    with serving(repo, **settings) as server:
        capture(server, "a", 80)
        first = kept()
        assert first == sent[-len(first) :] and len(first) < 80  # the newest, and not all
        assert server.value("convserve_capture_evicted_images_total") == 80 - len(first)
        assert server.value("convserve_capture_bytes") == our_bytes() <= budget
    other.write_bytes(b"not ours")
    stale = folder / "dim" / ".w0-5.png.tmp"  # a write a crash interrupted
    stale.write_bytes(b"half an image")
    with serving(repo, **settings) as server:  # a restart: what is there counts
        capture(server, "b", 5)
        second = kept()
        assert second == sent[-len(second) :] and second[0].startswith("a")
        assert server.value("convserve_capture_bytes") == our_bytes() <= budget
    assert other.read_bytes() == b"not ours" and not stale.exists()


# ----------------------------------------------------------------------------- workers
def test_each_worker_writes_its_own_files_within_its_share_of_the_budget(repo, tmp_path):
    folder, rng, budget = tmp_path / "captures", np.random.default_rng(4), 40_000
    flags = ["--workers", "2", "--capture-dir", str(folder), "--capture-rate", "1"]
    with running_server(repo, tmp_path, *flags, "--capture-max-bytes", str(budget)) as s:
        for _ in range(8):  # separate connections: SO_REUSEPORT spreads connections
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(s.target, options=options) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                for j in range(25):
                    stub.Predict(predict("gray", [image(j % 4, GRAY, rng)]))
        # the parent's /metrics: counters summed over the workers
        wait_for("200 images captured", lambda: metric_value(s.metrics(), CAPTURED) == 200)
        evicted = metric_value(s.metrics(), "convserve_capture_evicted_images_total")
        assert metric_value(s.metrics(), DROPPED) == 0 and evicted > 0
    assert len(pngs_in(folder)) == 200 - evicted
    workers = {p.name.split("-")[0] for p in pngs_in(folder)}
    assert workers <= {"w0", "w1"} and workers
    for w in workers:  # each worker: its own JSONL files, describing only its images
        mine = [p for p in folder.rglob(f"{w}-*")] + list(folder.glob(f"captures-{w}-*"))
        assert sum(p.stat().st_size for p in mine) <= budget // 2
        assert all(Path(ln["file"]).name.startswith(f"{w}-") for ln in lines_in(folder, w + "-"))


# ----------------------------------------------------------------------------- retraining
@pytest.mark.slow  # imports torch and trains one short epoch (about 15 s)
def test_the_captured_folder_trains_with_cnn_train_on_the_imagefolder_recipe(repo, tmp_path):
    folder, run, rng = tmp_path / "captures", tmp_path / "run", np.random.default_rng(5)
    with serving(repo, capture_dir=folder, capture_rate=1.0) as server, server.channel() as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for _ in range(20):
            stub.Predict(predict("gray", [image(k, GRAY, rng) for k in range(4)]))
        wait_accounted(server, 80)
    # A user corrects a label: moves an image to the class it really is.
    wrong = pngs_in(folder)[0]
    wrong.rename(folder / "mid" / wrong.name)
    train = subprocess.run(
        [str(Path(sys.executable).parent / "cnn-train"), "--recipe", "imagefolder",
         "--data-dir", str(folder), "--out", str(run), "--quiet", "--no-export", "--no-report",
         "data.image_size=16", "data.channels=1", "data.val_size=8", "train.epochs=1",
         "train.batch_size=16", "model.layers=[{type: conv, filters: 8}, {type: pool},"
         " {type: global_pool, kind: max}]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["classes"] == sorted(DEFAULT_LABELS)  # the label folders, sorted
