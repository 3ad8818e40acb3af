"""`cnn-bench`: a gRPC load generator for convserve (and any KServe V2 server).

    cnn-bench --target localhost:50051 --concurrency 32 --duration 10
    cnn-bench --target localhost:50051 --rate 1500 --duration 10 --json out.json
    cnn-bench --target localhost:8001 --mode v2 --model fashion-mnist --shape 1,28,28

Two ways to load a server:

- closed loop (`--concurrency N`): N requests in flight; each waits for its answer before
  sending the next. Latency is send -> answer. Good for "how fast can it go".
- open loop (`--rate R`): requests are due at fixed times (one every 1/R s) whatever the
  server does, and latency is measured from the time a request was *due*, not from when it
  was sent. A server (or a client) that falls behind therefore shows up in the latency
  instead of silently lowering the offered load ("coordinated omission").

Requests are built and serialised once (identity serialisers on the channel), and responses
are not parsed except the first of each kind (checked for the right number of predictions),
so the client spends its CPU on gRPC itself. `--processes P` starts P client processes (each
with its own event loop and channels) and merges their latency samples. `--connections C`
opens C separate HTTP/2 connections: a `--workers N` server shares its port by SO_REUSEPORT,
which spreads connections, not requests, so use >= 8.

Latency samples are kept whole (a float per request) and merged exactly, so p99 and max are
the real ones, not bucket edges.

Modules: `config` (LoadConfig: every flag's default, help and bounds), `messages` (what is
sent, what is checked), `runner` (the processes and their loops), `report` (samples,
percentiles, the report), `cli` (the command).
"""

from serving.client.loadgen.cli import config_from_args, main
from serving.client.loadgen.config import (
    MAX_MESSAGE_BYTES,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    MODES,
    PREDICT,
    PREDICT_STREAM,
    LoadConfig,
    resolve,
)
from serving.client.loadgen.messages import (
    DISTINCT_REQUESTS,
    build_requests,
    check_response,
    infer_request,
    parse_stream_infer,
    predict_request,
    synthetic_images,
)
from serving.client.loadgen.report import Samples, format_table, percentiles, report
from serving.client.loadgen.runner import Worker, run_load

__all__ = [
    "DISTINCT_REQUESTS",
    "MAX_MESSAGE_BYTES",
    "MODEL_INFER",
    "MODEL_STREAM_INFER",
    "MODES",
    "PREDICT",
    "PREDICT_STREAM",
    "LoadConfig",
    "Samples",
    "Worker",
    "build_requests",
    "check_response",
    "config_from_args",
    "format_table",
    "infer_request",
    "main",
    "parse_stream_infer",
    "percentiles",
    "predict_request",
    "report",
    "resolve",
    "run_load",
    "synthetic_images",
]
