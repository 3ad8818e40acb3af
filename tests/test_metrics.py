"""Metrics end to end: the Prometheus rules and the Grafana dashboard are valid, a real
Prometheus scrapes a real server and sees exactly the workload that was sent, and with
`--workers N` the parent's /metrics is the exact sum over workers, keeps a dead worker's
counts and drops its live gauges.

The scraped server is built in this process with a registry of its own, exposed by
prometheus_client's `start_http_server` as `cnn-serve` exposes its registry; values are read
back from that registry. `cnn-serve` processes serve what only a process shows: its own
/proc figures, `--workers N`, the multiprocess folder and `--no-metrics` (no listener).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import Metrics
from serving.observers import ModelObserver
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc
from tests.inprocess import InProcessServer, serving
from tests.serving_helpers import (
    PROMETHEUS_DIR,
    ROOT,
    RULE_FILES,
    Prometheus,
    codes_of,
    metric_value,
    running_server,
    wait_for,
)
from tests.tiny_models import write_version

MODEL = "fashion-mnist"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "convserve.json"
PROCESS_GAUGES = (
    "convserve_process_cpu_seconds",
    "convserve_process_resident_memory_bytes",
    "convserve_process_open_fds",
)


# ----------------------------------------------------------------------------- promtool
def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: `apt-get install prometheus` (`make test` installs it)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_prometheus_config_is_valid():
    r = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_files_are_valid():
    assert [p.name for p in RULE_FILES] == ["alerts.yml", "recording.yml"]
    r = promtool("check", "rules", *map(str, RULE_FILES))
    assert r.returncode == 0, r.stdout + r.stderr


def test_rule_unit_tests_pass():
    tests = sorted(PROMETHEUS_DIR.glob("tests/*.yml"))
    assert tests
    r = promtool("test", "rules", *map(str, tests))
    assert r.returncode == 0, r.stdout + r.stderr


def recorded_names() -> set[str]:
    return {m for p in RULE_FILES for m in re.findall(r"record: (\S+)", p.read_text())}


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard, Grafana variables replaced by test values."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    subs = {"$job": "convserve", "$__rate_interval": "1m"}
    for k, v in subs.items():
        exprs = [e.replace(k, v) for e in exprs]
    return exprs


def test_dashboard_is_json_and_reads_only_recording_rules_that_exist():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "convserve" and dash["panels"]
    used = {m for e in dashboard_queries() for m in re.findall(r"\bjob_[a-z_]+:[a-z_:0-9]+", e)}
    assert used, "the dashboard should read the recording rules"
    assert used <= recorded_names(), f"unknown recording rules: {used - recorded_names()}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# ----------------------------------------------------------------------------- workload
@dataclass(frozen=True)
class Workload:
    """A known mix of RPCs: good Predicts (the i-th carries 1 + i % 4 images, counting
    from `start`), bad image bytes (INVALID_ARGUMENT), an unknown model (NOT_FOUND) and
    GetModelInfo calls."""

    ok: int = 37
    invalid: int = 5
    not_found: int = 3
    model_info: int = 2
    start: int = 0

    @property
    def images(self) -> int:
        return sum(1 + i % 4 for i in range(self.start, self.start + self.ok))

    @property
    def requests(self) -> dict[tuple[str, str], int]:
        return {
            ("Predict", "OK"): self.ok,
            ("Predict", "INVALID_ARGUMENT"): self.invalid,
            ("Predict", "NOT_FOUND"): self.not_found,
            ("GetModelInfo", "OK"): self.model_info,
        }

    def then(self, **counts: int) -> Workload:
        """The workload that follows this one (its Predicts numbered on from ours)."""
        return Workload(**counts, start=self.start + self.ok)

    def __add__(self, later: Workload) -> Workload:
        assert later.start == self.start + self.ok
        return Workload(
            self.ok + later.ok,
            self.invalid + later.invalid,
            self.not_found + later.not_found,
            self.model_info + later.model_info,
            self.start,
        )

    def send(self, stub: pb_grpc.ClassifierStub) -> None:
        rng = np.random.default_rng(self.start)
        for i in range(self.start, self.start + self.ok):
            x = rng.integers(0, 256, (1 + i % 4, 1, 28, 28), dtype=np.uint8)
            images = [
                pb.Image(tensor=pb.Tensor(dtype=pb.UINT8, shape=[1, 28, 28], data=r.tobytes()))
                for r in x
            ]
            assert len(
                stub.Predict(pb.PredictRequest(images=images), timeout=10).predictions
            ) == len(x)
        bad_bytes = pb.PredictRequest(images=[pb.Image(encoded=b"not an image")])
        no_model = pb.PredictRequest(model="no-such-model", images=[pb.Image(encoded=b"x")])
        for req, code, n in (
            (bad_bytes, grpc.StatusCode.INVALID_ARGUMENT, self.invalid),
            (no_model, grpc.StatusCode.NOT_FOUND, self.not_found),
        ):
            for _ in range(n):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Predict(req, timeout=10)
                assert err.value.code() == code, err.value.details()
        for _ in range(self.model_info):
            assert stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10).name == MODEL


def new_channel(target: str) -> grpc.Channel:
    # A local subchannel pool: each channel opens its own connection (grpc otherwise shares
    # one between channels with the same target), so SO_REUSEPORT can spread them.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


Samples = list[tuple[dict[str, str], float]]


def samples(text: str, name: str) -> Samples:
    """(labels, value) of every sample called `name` in a /metrics text."""
    return [
        (s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    ]


def requests_by_method_code(requests: Samples) -> dict[tuple[str, str], int]:
    """convserve_requests_total's samples, by (method, code), those that are not 0."""
    return {(lab["method"], lab["code"]): int(v) for lab, v in requests if v}


def worker_pids(text: str, gauge: str) -> set[str]:
    return {lab["pid"] for lab, _ in samples(text, gauge)}


# One request of each kind, then the rest (the scraped server sends the rest only once
# Prometheus has its first sample).
FIRST = Workload(ok=1, invalid=1, not_found=1, model_info=1)
REST = FIRST.then(ok=37, invalid=5, not_found=3, model_info=2)


def send(server: InProcessServer, workload: Workload) -> None:
    with server.channel() as ch:
        workload.send(pb_grpc.ClassifierStub(ch))


@pytest.fixture(scope="module")
def counted(model_repository) -> Iterator[InProcessServer]:
    """One in-process server that has handled FIRST + REST."""
    with serving(model_repository, max_queue_delay_us=1000) as server:
        send(server, FIRST)
        send(server, REST)
        yield server


@dataclass
class Scraped:
    server: InProcessServer
    prometheus: Prometheus
    sent: Workload  # everything the server handled
    scraped: Workload  # the part sent after Prometheus's first scrape


@pytest.fixture(scope="module")
def scraped(model_repository, tmp_path_factory) -> Iterator[Scraped]:
    """One server, scraped every second by a real Prometheus, and a known workload.

    One request of each kind goes first, before Prometheus's first scrape: a labelled
    counter series only appears with its first increment, and rate() cannot see the
    increments that happened before a series' first sample (as on any freshly started
    server). The rest follows once Prometheus has that first sample.
    """
    tmp = tmp_path_factory.mktemp("prometheus")
    with serving(model_repository, max_queue_delay_us=1000) as server:
        send(server, FIRST)
        httpd, _ = start_http_server(0, "127.0.0.1", server.registry)  # as cnn-serve's own
        prom = Prometheus(tmp, f"127.0.0.1:{httpd.server_port}")
        try:
            prom.wait_ready()
            send(server, REST)
            prom.wait_scrapes_after(time.time())
            yield Scraped(server, prom, FIRST + REST, REST)
        finally:
            prom.stop()
            httpd.shutdown()
            httpd.server_close()


def test_metrics_count_the_workload_exactly(counted):
    server, w = counted, FIRST + REST
    model = {"model": MODEL, "version": "1"}
    assert requests_by_method_code(server.samples("convserve_requests_total")) == w.requests
    assert server.value("convserve_inference_items_total", **model) == w.images
    assert server.value("convserve_batch_size_sum", **model) == w.images
    assert server.value("convserve_queue_wait_seconds_count", **model) == w.ok
    calls = sum(n for (m, _), n in w.requests.items() if m == "Predict")
    assert server.value("convserve_request_duration_seconds_count", method="Predict") == calls
    assert server.value("convserve_rejected_requests_total", reason="invalid_argument") == (
        w.invalid
    )
    assert server.value("convserve_rejected_requests_total", reason="not_found") == w.not_found
    assert server.value("convserve_inflight_requests") == 0
    assert server.value("convserve_queue_depth", **model) == 0


def test_metrics_describe_the_served_model(counted):
    server = counted
    (info,) = [(lab, v) for lab, v in server.samples("convserve_model_info") if v]
    assert info == (
        {
            "model": MODEL,
            "version": "1",
            "provider": "CPUExecutionProvider",
            "opset": info[0]["opset"],
            "requested_device": "auto",
        },
        1.0,
    )
    assert int(info[0]["opset"]) >= 13
    assert server.value("convserve_models_loaded") == 1
    assert server.value("convserve_model_loads_total", model=MODEL) == 1
    assert not any(v for _, v in server.samples("convserve_model_load_failures_total"))


def test_metrics_text_describes_the_server_process(tmp_path):
    """One `cnn-serve` process reports its own CPU, memory and fds, without a pid label."""
    write_version(tmp_path / "models")
    with running_server(tmp_path / "models", tmp_path) as s:
        text = s.metrics()
    for gauge in PROCESS_GAUGES:
        ((labels, value),) = samples(text, gauge)
        assert labels == {} and value > 0, gauge  # one process, no pid label


@pytest.mark.slow  # a real Prometheus (the `scraped` fixture: about 8 s)
def test_prometheus_scrapes_exact_request_and_image_counts(scraped):
    prom, w = scraped.prometheus, scraped.sent
    got = {
        (r["metric"]["method"], r["metric"]["code"]): int(float(r["value"][1]))
        for r in prom.query("sum by (method, code) (convserve_requests_total) > 0")
    }
    assert got == w.requests
    assert prom.value("sum(convserve_inference_items_total)") == w.images


@pytest.mark.slow
def test_prometheus_sees_observations_in_every_histogram(scraped):
    prom, w = scraped.prometheus, scraped.sent
    assert prom.value('sum(convserve_request_duration_seconds_count{method="Predict"})') > 0
    assert prom.value("sum(convserve_queue_wait_seconds_count)") == w.ok
    assert prom.value("sum(convserve_batch_compute_seconds_count)") > 0
    assert prom.value("sum(convserve_batch_size_count)") > 0
    assert prom.value("sum(convserve_batch_size_sum)") == w.images


def rule_value(prom: Prometheus, expr: str) -> float:
    (result,) = wait_for(f"a value of {expr}", lambda: prom.query(expr), timeout=10)
    return float(result["value"][1])


@pytest.mark.slow
def test_mean_batch_size_rule_is_rows_per_batch_of_the_scraped_workload(scraped):
    prom = scraped.prometheus
    got = rule_value(prom, 'job_model:convserve_batch_size:mean_rate5m{model="fashion-mnist"}')
    # Counters only grow, so the smallest sample in the window is the first scrape's.
    since_first = "sum({0}) - sum(min_over_time({0}[5m]))"
    rows = prom.value(since_first.format("convserve_batch_size_sum"))
    batches = prom.value(since_first.format("convserve_batch_size_count"))
    assert rows == scraped.scraped.images
    # rate() extrapolates each series to the window's edges a little differently.
    assert got == pytest.approx(rows / batches, rel=0.05)


@pytest.mark.slow
def test_error_ratio_rule_sees_the_failed_predicts(scraped):
    w = scraped.scraped
    failed, calls = w.invalid + w.not_found, w.ok + w.invalid + w.not_found
    got = rule_value(
        scraped.prometheus, 'job_method:convserve_requests_errors:ratio_rate5m{method="Predict"}'
    )
    # Loose: rate() extrapolates series that started at different values differently.
    assert got == pytest.approx(failed / calls, rel=0.3)


@pytest.mark.slow
def test_every_rule_loads_and_evaluates_without_error(scraped):
    groups = scraped.prometheus.get("/api/v1/rules")["data"]["groups"]
    assert sorted(g["name"] for g in groups) == ["convserve.alerts", "convserve.recording"]
    rules = [r for g in groups for r in g["rules"]]
    defined = [m for p in RULE_FILES for m in re.findall(r"- (?:record|alert): ", p.read_text())]
    assert len(rules) == len(defined)
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]


@pytest.mark.slow
def test_error_ratio_alert_goes_pending_on_real_errors(scraped):
    # 8 of 45 Predicts failed: far above the 5% threshold, but `for: 5m` has not passed.
    def state() -> str:
        alerts = scraped.prometheus.get("/api/v1/alerts")["data"]["alerts"]
        return next(
            (a["state"] for a in alerts if a["labels"]["alertname"] == "ConvserveHighErrorRatio"),
            "",
        )

    assert wait_for("ConvserveHighErrorRatio to go pending", state, timeout=10) == "pending"


@pytest.mark.slow
def test_every_dashboard_query_is_valid_promql_with_data_where_expected(scraped):
    prom = scraped.prometheus
    empty = []
    for expr in dashboard_queries():
        if not prom.query(expr):  # `query` asserts the query is accepted
            empty.append(expr)
    # Series that only exist after a swap or a failed load have no data yet.
    assert all(re.search("swaps|failures", e) for e in empty), empty


# ----------------------------------------------------------------------------- --workers 2
def per_worker(mp_dir: Path, kind: str, name: str) -> dict[str, float]:
    """`name` summed per worker pid, read from the multiprocess files themselves (`kind` is
    the file prefix: counter, gauge_livemax, ...); the parent's /metrics only has totals."""
    out = {}
    for path in mp_dir.glob(f"{kind}_*.db"):
        if path.stat().st_size == 0:  # a (restarted) worker creating it: read on the next poll
            continue
        fams = MultiProcessCollector.merge([str(path)], accumulate=False)
        out[path.stem.rsplit("_", 1)[1]] = sum(
            s.value for f in fams for s in f.samples if s.name == name
        )
    return out


def test_one_server_with_the_multiprocess_variable_makes_its_folder_and_serves_metrics(
    model_repository, tmp_path
):
    """The serving image and the Kubernetes Deployment once set PROMETHEUS_MULTIPROC_DIR with
    one worker: prometheus_client then writes into a folder nobody made, and the server died
    at its first metric. Files a previous run left are wiped, as `--workers N` does."""
    mp_dir = tmp_path / "not-made-yet" / "prom"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    with running_server(model_repository, tmp_path, env=env) as s:
        w = Workload(ok=3, invalid=0, not_found=0, model_info=0)
        with new_channel(s.target) as ch:
            w.send(pb_grpc.ClassifierStub(ch))
        text = s.metrics()
        assert codes_of(text) == {"OK": 3}
        assert metric_value(text, "convserve_models_loaded") == 1
        assert list(mp_dir.glob("counter_*.db"))
    first = {f.name for f in mp_dir.iterdir()}
    with running_server(model_repository, tmp_path, env=env) as s:
        assert not first & {f.name for f in mp_dir.iterdir()}  # the last run's files wiped


@pytest.mark.slow  # about 3 s: workers, a kill, a restart
def test_workers_aggregate_exactly_and_keep_a_dead_workers_counts(model_repository, tmp_path):
    mp_dir = tmp_path / "prom-multiproc"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}
    with running_server(model_repository, tmp_path, "--workers", "2", env=env) as s:
        rss = "convserve_process_resident_memory_bytes"

        def two_ready_workers(without: int = 0) -> set[str]:
            """Worker pids, once two have loaded the model and reported their RSS."""
            loaded = per_worker(mp_dir, "gauge_livemax", "convserve_models_loaded")
            ready = {pid for pid, n in loaded.items() if n == 1}
            sizes = {lab["pid"]: v for lab, v in samples(s.metrics(), rss)}
            ok = len(ready) == 2 and str(without) not in ready
            return ready if ok and all(sizes.get(p, 0) > 0 for p in ready) else set()

        pids = wait_for("2 loaded workers", two_ready_workers, timeout=60)
        cores = len(os.sched_getaffinity(0))
        for pid in pids:  # ORT's threads are shared out, not one per core in every worker
            loaded = re.search(rf"\[{pid}\]: loaded .*, (\S+) intra-op threads\)", s.log())
            assert loaded, s.log()
            assert loaded.group(1) == str(max(1, cores // 2))
        w, channels = Workload(ok=2, invalid=1, not_found=0, model_info=0), 16
        for c in range(channels):  # separate connections: SO_REUSEPORT spreads connections
            with new_channel(s.target) as ch:
                replace(w, start=c * w.ok).send(pb_grpc.ClassifierStub(ch))
        expected = {k: n * channels for k, n in w.requests.items() if n}
        images = Workload(ok=channels * w.ok).images
        probes = 0  # one-image Predicts sent after the kill (each on a fresh connection)

        def check_totals(text: str) -> None:
            want = {**expected, ("Predict", "OK"): expected[("Predict", "OK")] + probes}
            assert requests_by_method_code(samples(text, "convserve_requests_total")) == want
            assert metric_value(text, "convserve_inference_items_total") == images + probes
            assert metric_value(text, "convserve_batch_size_sum") == images + probes
            assert metric_value(text, "convserve_rejected_requests_total") == w.invalid * channels
            assert metric_value(text, "convserve_models_loaded") == 1  # livemax, not a sum

        text = s.metrics()
        check_totals(text)
        for gauge in PROCESS_GAUGES:
            assert worker_pids(text, gauge) == pids, gauge
        handled = per_worker(mp_dir, "counter", "convserve_requests_total")
        assert handled.keys() == pids
        assert all(handled.values()), f"one worker got every connection: {handled}"
        assert sum(handled.values()) == sum(expected.values())  # the parent's total

        victim = int(max(handled, key=handled.__getitem__))
        os.kill(victim, signal.SIGKILL)
        gone = lambda: str(victim) not in worker_pids(s.metrics(), rss)  # noqa: E731
        wait_for("the dead worker's live gauges to go", gone, timeout=10)
        assert not list(mp_dir.glob(f"gauge_live*_{victim}.db"))  # its live-gauge files too
        assert list(mp_dir.glob(f"counter_{victim}.db"))  # but not its counters
        check_totals(s.metrics())  # its counters stay in the totals

        def probe() -> None:  # the port answers: a fresh connection, one image, OK
            nonlocal probes
            with new_channel(s.target) as ch:
                Workload(ok=1, invalid=0, not_found=0, model_info=0).send(
                    pb_grpc.ClassifierStub(ch)
                )
            probes += 1

        restart_by = time.monotonic() + 30
        while not two_ready_workers(without=victim):  # while the replacement loads
            assert time.monotonic() < restart_by, "no replacement worker after 30 s"
            probe()
        assert probes >= 1, "the replacement was ready before the port could be probed"
        for _ in range(channels):  # and after, across both workers
            probe()
        text = s.metrics()
        check_totals(text)
        assert metric_value(text, "convserve_model_loads_total") == 3  # 2 workers + 1 restart


def test_no_metrics_serves_and_records_nothing(model_repository, tmp_path):
    """`--no-metrics` (the benchmark's baseline for pricing metrics): no listener, and the
    server still answers; a disabled Metrics object leaves its registry empty."""
    with running_server(model_repository, tmp_path, "--no-metrics") as s:
        with new_channel(s.target) as ch:
            Workload(ok=2, invalid=1, not_found=0, model_info=0).send(pb_grpc.ClassifierStub(ch))
        with pytest.raises(urllib.error.URLError):
            s.metrics()
    registry = CollectorRegistry()
    m = Metrics(registry, enabled=False)
    m.request_done("Predict", "OK", 0.001)
    m.inflight.inc()
    ModelObserver(m, "m", "1").batch(4, 0.01)
    values = [s.value for f in registry.collect() for s in f.samples]
    assert not any(values), "a disabled Metrics recorded something"
    registry = CollectorRegistry()
    on = Metrics(registry)
    on.request_done("Predict", "OK", 0.001)
    on.request_done("Predict", "OK", 0.002)
    labels = {"method": "Predict", "code": "OK", "protocol": "grpc"}
    assert registry.get_sample_value("convserve_requests_total", labels) == 2
