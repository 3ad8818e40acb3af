"""Benchmark: what OpenTelemetry tracing costs the server, as an interleaved A/B.

The same single-worker convserve server, loaded by h2load with single-image Predicts at
concurrency 64 (no traceparent: every call is a root the server's sampler decides), as:

- `before`: the build before tracing, a checkout of that commit given with `--base`
  (run from there: `python -m` imports its `serving` first); left out without `--base`;
- `tracing off`: this checkout, no OTEL_* variables (the default);
- `tracing on`: OTEL_TRACES_EXPORTER=otlp, exporting to an OTLP/gRPC receiver in this
  process (so the spans really leave: it parses each export and counts its spans), every
  call sampled (the default sampler, parentbased_always_on);
- `tracing on, 1 in 100`: the same with OTEL_TRACES_SAMPLER=parentbased_traceidratio 0.01.

The systems take turns `--repeats` times, each round in a rotated order, so that the drift of
a shared machine hits all alike; each run is bracketed by correctness passes (as in
serving_bench.py). Reports each system's median requests/s and its spread (min..max), the
server's CPU per request, spans received per request and the receiver's CPU, the cost of
tracing (1 - on/off) and whether tracing off's median lies inside the spread of `before`.

    python bench/tracing_cost.py --base CHECKOUT_BEFORE --out bench/results/tracing_cost.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import resource
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import grpc
import onnxruntime as ort
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving_bench as sb

BEFORE, OFF, ON, SAMPLED = "before", "tracing off", "tracing on", "tracing on, 1 in 100"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()
        self.server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self._lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def bookkeeping_us(endpoint: str, n: int = 3000) -> dict[str, float]:
    """In-process cost of one traced single-image call: the CPU time its spans take on the
    calling thread (the event loop's, in the server: the call span from a traceparent, its
    decode and queue spans, a batch span and its compute span, the end), and the time the
    OTLP exporter then spends encoding those 5 spans (on the batch span processor's
    thread); and the checks tracing off leaves on the path (the front end's `is None`, the
    batcher's context variable read and its per-run list), in nanoseconds."""
    import os
    import time

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving import tracing

    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        t = tracing.tracing_from_environ()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert t is not None
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    attrs = tracing.model_attributes("fashion-mnist", 1, "CPUExecutionProvider")
    rpc = {"rpc.system": "grpc", "rpc.service": "convserve.v1.Classifier", "rpc.method": "Predict"}

    def one_call() -> None:
        call = t.call("convserve.v1.Classifier/Predict", carrier, rpc)
        assert call is not None
        now = time.monotonic()
        call.queued(now, now, 1, attrs)
        tracing.record_batch([call], now, 1e-4, 1, 1, attrs)
        call.end_rpc(0)

    c0 = time.thread_time()
    for i in range(n):
        one_call()
        if i % 200 == 199:  # leave the exporter time to keep up (its queue holds 2048)
            t.provider.force_flush()
    spans = (time.thread_time() - c0) / n * 1e6
    memory = InMemorySpanExporter()
    t.provider.add_span_processor(SimpleSpanProcessor(memory))
    for _ in range(500):
        one_call()
    finished = memory.get_finished_spans()
    c0 = time.thread_time()
    for i in range(0, len(finished), 512):  # the batch span processor's export batches
        encode_spans(finished[i : i + 512]).SerializeToString()
    encode = (time.thread_time() - c0) / 500 * 1e6
    t.shutdown()

    class Part:
        trace = None

    plane, parts, m = Part(), [(Part(), 0, 1)], 200_000
    c0 = time.perf_counter()
    for _ in range(m):
        _ = None if plane.trace is None else 1  # the front end's check
        _ = tracing.current_call()  # the batcher's read
        _ = [r.trace for r, _, _ in parts if r.trace is not None]  # its per-run list
    off = (time.perf_counter() - c0) / m * 1e9
    return {
        "tracing_on_spans_us_per_call": round(spans, 1),
        "tracing_on_otlp_encoding_us_per_call": round(encode, 1),
        "tracing_off_ns_per_call": round(off, 1),
    }


def cpu_seconds_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, help="holds fashion-mnist/<version>/")
    p.add_argument("--work", type=Path, default=sb.ROOT / "runs/bench-serving")
    p.add_argument("--out", type=Path, default=sb.ROOT / "bench/results/tracing_cost.json")
    p.add_argument("--base", type=Path, help="a checkout of the commit before tracing")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    args = p.parse_args()
    model = sb.find_model(args.model_repository, args.work)
    images = sb.test_images((1, 28, 28))
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = sess.run(["probabilities"], {"images": images[:1024]})[0]
    del sess
    receiver = Receiver()
    receiver.server.start()
    port, mport = sb.free_port(), sb.free_port()
    target = f"127.0.0.1:{port}"
    (serve,) = [s for s in sb.systems(model, port, mport, True) if s.name == "convserve"]
    c64 = sb.SINGLE[-1]
    otlp = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
    }
    ratio = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}
    systems = {
        OFF: sb.System(OFF, "convserve", serve.command, (c64,)),
        ON: sb.System(ON, "convserve", serve.command, (c64,), env=otlp),
        SAMPLED: sb.System(SAMPLED, "convserve", serve.command, (c64,), env={**otlp, **ratio}),
    }
    if args.base:
        base = sb.System(BEFORE, "convserve", serve.command, (c64,), cwd=args.base.resolve())
        systems = {BEFORE: base, **systems}
    names = list(systems)
    runs: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    spans: dict[str, list[float]] = {n: [] for n in names}
    receiver_cpu: dict[str, list[float]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for rep in range(args.repeats):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                system = systems[name]
                with sb.started(system, port, tmp / "server.log") as proc:
                    probe = sb.answer_probe(system, target, c64, images, expected)
                    sb.wait_ready(system, proc, tmp / "server.log", probe, timeout=120)
                    spans0, rcpu0 = receiver.spans, cpu_seconds_self()
                    r = sb.measure(system, proc, target, port, c64, images, expected, args, tmp)
                    assert r["valid"], f"{name}: answers were not all correct"
                    loaded = args.warmup + r["seconds"]
                    # spans of the measured run, its warm-up and its correctness passes
                    served = loaded * r["requests_per_s"]
                    runs[name].append(r["requests_per_s"])
                    cpu[name].append(r["server_cpu_ms_per_request"])
                    spans[name].append(round((receiver.spans - spans0) / served, 3))
                    receiver_cpu[name].append(round((cpu_seconds_self() - rcpu0) / loaded, 3))
                    print(f"{rep} {name:<22} {r['requests_per_s']:8.1f} req/s", flush=True)
    bookkeeping = bookkeeping_us(f"http://127.0.0.1:{receiver.port}")
    receiver.server.stop(0)
    med = {n: statistics.median(runs[n]) for n in names}
    summary = {
        n: {
            "req_s_median": round(med[n], 1),
            "req_s_min": round(min(runs[n]), 1),
            "req_s_max": round(max(runs[n]), 1),
            "server_cpu_ms_per_request": round(statistics.median(cpu[n]), 4),
            "spans_per_request": statistics.median(spans[n]),
            "receiver_cpu_cores": statistics.median(receiver_cpu[n]),
        }
        for n in names
    }
    costs = {
        "tracing on vs off (1 - on/off, req/s)": round(1 - med[ON] / med[OFF], 4),
        "1 in 100 vs off (1 - on/off, req/s)": round(1 - med[SAMPLED] / med[OFF], 4),
        "tracing on vs off (server CPU per request)": round(
            summary[ON]["server_cpu_ms_per_request"] / summary[OFF]["server_cpu_ms_per_request"]
            - 1,
            4,
        ),
    }
    if args.base:
        costs["off vs before (1 - off/before, req/s)"] = round(1 - med[OFF] / med[BEFORE], 4)
        costs["off inside before's spread"] = min(runs[BEFORE]) <= med[OFF] <= max(runs[BEFORE])
    report = {
        "model": str(model),
        "machine": sb.machine(),
        "method": f"h2load, single-image Predict at c64, 1 worker, {args.repeats} rounds of "
        f"{args.duration:.0f} s (+{args.warmup:.0f} s warm-up) per system, the order rotated "
        "each round; medians and min..max",
        "base": str(args.base) if args.base else None,
        "runs": runs,
        "server_cpu_ms_per_request": cpu,
        "spans_per_request": spans,
        "summary": summary,
        "costs": costs,
        "bookkeeping": bookkeeping,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"summary": summary, "costs": costs, "bookkeeping": bookkeeping}, indent=2))


if __name__ == "__main__":
    main()
