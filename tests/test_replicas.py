"""Several replicas: client-side round_robin spreads requests, a replica that receives SIGTERM
mid-load costs the caller nothing, and --max-connection-age makes clients reconnect.

Two real `cnn-serve` processes bind the same port on 127.0.0.2 and 127.0.0.3 (what two pods
behind a headless Service look like to a client), each with its own metrics address, and each
one's own request counter says where the requests went.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from serving.client import Client
from tests.serving_helpers import (
    ROOT,
    ServerProcess,
    free_port,
    metric_value,
    running_server,
    start_server,
    wait_serving,
)

HOSTS = ("127.0.0.2", "127.0.0.3")
IMAGE = np.zeros((1, 28, 28), np.uint8)


def predicts(server: ServerProcess) -> float:
    return metric_value(server.metrics(), "convserve_requests_total", method="Predict", code="OK")


@pytest.fixture
def replicas(model_repository, tmp_path) -> Iterator[list[ServerProcess]]:
    port, mport = free_port(), free_port()
    servers = [
        start_server(model_repository, tmp_path, host=h, port=port, metrics_port=mport, wait=False)
        for h in HOSTS
    ]
    try:
        for s in servers:
            wait_serving(s)
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_round_robin_client_spreads_requests_over_both_replicas(replicas):
    before = [predicts(s) for s in replicas]
    with Client([s.target for s in replicas]) as client:
        for _ in range(200):
            assert len(client.predict([IMAGE])) == 1
    got = [predicts(s) - b for s, b in zip(replicas, before, strict=True)]
    assert sum(got) == 200
    assert min(got) >= 0.3 * 200, got


@pytest.mark.slow
def test_cnn_bench_spreads_a_comma_list_target_over_both_replicas(replicas, tmp_path):
    before = [predicts(s) for s in replicas]
    out = tmp_path / "bench.json"
    target = ",".join(s.target for s in replicas)
    args = ["--target", target, "--concurrency", "4", "--duration", "1.5", "--warmup", "0.3"]
    run = subprocess.run(
        [sys.executable, "-m", "serving.client.loadgen", *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["requests"] > 0 and report["error_count"] == 0, report
    got = [predicts(s) - b for s, b in zip(replicas, before, strict=True)]
    assert min(got) >= 0.3 * sum(got), got


def test_sigterm_to_one_replica_mid_load_returns_no_error_to_the_caller(replicas):
    doomed, survivor = replicas
    threads, per_thread = 4, 60
    errors: list[BaseException] = []
    done = 0
    lock = threading.Lock()
    halfway = threading.Event()

    def work(client: Client) -> None:
        nonlocal done
        for _ in range(per_thread):
            try:
                assert len(client.predict([IMAGE])) == 1
            except BaseException as exc:  # every failure reaches the assertion below
                errors.append(exc)
            with lock:
                done += 1
                if done == threads * per_thread // 3:
                    halfway.set()

    with Client([s.target for s in replicas]) as client:
        pool = [threading.Thread(target=work, args=(client,)) for _ in range(threads)]
        for t in pool:
            t.start()
        assert halfway.wait(60)
        served_before_sigterm = predicts(doomed)
        doomed.proc.terminate()  # SIGTERM: drain, then exit
        for t in pool:
            t.join(120)
    assert not errors, errors[:3]
    assert done == threads * per_thread
    assert served_before_sigterm > 0
    assert doomed.proc.wait(60) == 0, doomed.log()
    assert predicts(survivor) > 0


READY = grpc.ChannelConnectivity.READY


def test_max_connection_age_makes_a_dns_target_client_reconnect_without_errors(
    model_repository, tmp_path
):
    age = ["--max-connection-age", "1", "--max-connection-age-grace", "1"]
    with running_server(model_repository, tmp_path, *age) as server:
        states: list[grpc.ChannelConnectivity] = []
        with Client(f"dns:///localhost:{server.port}") as client:
            client.channel.subscribe(states.append)
            assert len(client.predict([IMAGE])) == 1
            deadline = time.monotonic() + 10
            # The server sends GOAWAY after ~1 s (+ jitter); the channel leaves READY.
            while time.monotonic() < deadline:
                # The callback runs on grpc's thread: READY may not be recorded yet.
                ready = states.index(READY) if READY in states else -1
                if ready >= 0 and any(s != READY for s in states[ready + 1 :]):
                    break
                time.sleep(0.1)
            assert len(client.predict([IMAGE])) == 1
            client.channel.unsubscribe(states.append)
        assert READY in states, states
        after_ready = states[states.index(READY) + 1 :]
        assert any(s != READY for s in after_ready), states
        assert metric_value(server.metrics(), "convserve_requests_total", code="OK") >= 2
