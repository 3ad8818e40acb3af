"""cnn-bench against a real server: the report must agree with what the server counted.

Never asserts speed: only that the figures are consistent and sane.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serving.client.loadgen import LoadConfig, run_load
from tests.serving_helpers import ROOT, metric_value, running_server


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    with running_server(model_repository, tmp_path_factory.mktemp("loadgen")) as s:
        yield s


def ok_count(server, method: str) -> float:
    return metric_value(server.metrics(), "convserve_requests_total", method=method, code="OK")


def check_sane(r: dict, images_per_request: int) -> None:
    lat = r["latency_ms"]
    assert r["requests"] > 0 and r["errors"] == {} and r["error_count"] == 0
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["requests_per_s"] == pytest.approx(r["requests"] / r["duration_s"], rel=0.01)
    assert r["images_per_s"] == pytest.approx(r["requests_per_s"] * images_per_request, rel=0.01)


def test_closed_loop_report_matches_the_servers_count(server):
    before = ok_count(server, "Predict")
    cfg = LoadConfig(target=server.target, concurrency=4, duration=1.5, warmup=0)
    r = run_load(cfg)
    check_sane(r, 1)
    assert r["loop"] == "closed" and r["concurrency"] == 4
    assert r["duration_s"] >= 1.5
    assert ok_count(server, "Predict") - before == r["requests"]


def test_open_loop_offers_the_rate_and_counts_every_request_due(server):
    before = ok_count(server, "Predict")
    cfg = LoadConfig(target=server.target, rate=100, duration=1.5, warmup=0, images_per_request=4)
    r = run_load(cfg)
    check_sane(r, 4)
    assert r["loop"] == "open" and r["rate"] == 100
    assert r["requests"] == 150  # one due every 10 ms for 1.5 s, all answered
    assert r["duration_s"] == 1.5 and r["max_send_lag_ms"] >= 0
    assert ok_count(server, "Predict") - before == r["requests"]


@pytest.mark.slow
def test_stream_mode_with_two_processes_merges_their_samples(server):
    before = ok_count(server, "PredictStream")
    cfg = LoadConfig(
        target=server.target, mode="stream", concurrency=4, processes=2, duration=1, warmup=0.2
    )
    r = run_load(cfg)
    check_sane(r, 1)
    assert r["processes"] == 2
    after = ok_count(server, "PredictStream")
    assert after - before == r["requests"] + r["warmup"]["requests"]


def test_cli_v2_mode_writes_the_json_report(server, tmp_path):
    before = ok_count(server, "ModelInfer")
    out = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "serving.client.loadgen",
        "--target",
        server.target,
        "--mode",
        "v2",
        "--concurrency",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0",
        "--images-per-request",
        "8",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "images/s" in proc.stdout and "p99" in proc.stdout
    r = json.loads(out.read_text())
    check_sane(r, 8)
    assert r["mode"] == "v2" and r["config"]["model"] == "fashion-mnist"
    assert ok_count(server, "ModelInfer") - before == r["requests"]


def test_errors_are_counted_by_status_code(server):
    # A model that does not exist: every request fails with NOT_FOUND, none is OK.
    cfg = LoadConfig(
        target=server.target,
        mode="v2",
        model="no-such-model",
        shape=(1, 28, 28),
        concurrency=2,
        duration=0.5,
        warmup=0,
    )
    r = run_load(cfg)
    assert r["requests"] == 0 and set(r["errors"]) == {"NOT_FOUND"} and r["error_count"] > 0
