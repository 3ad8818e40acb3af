"""The `cnn-bench` command: its flags, one run, the table (and JSON) it reports."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc

from serving.client.access import access_from_args, add_access_options
from serving.client.loadgen.config import MODES, LoadConfig
from serving.client.loadgen.report import format_table
from serving.client.loadgen.runner import run_load


def build_parser() -> argparse.ArgumentParser:
    d = LoadConfig()
    p = argparse.ArgumentParser(
        prog="cnn-bench",
        description="Load a convserve (or KServe V2) server over gRPC and report requests/s, "
        "images/s, latency percentiles and errors by status code.",
    )
    p.add_argument(
        "--target",
        default=d.target,
        help="HOST:PORT, dns:///NAME:PORT or a comma-list of IP:PORT (both round_robin)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="Predict, PredictStream, V2 ModelInfer, V2 ModelStreamInfer",
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=d.concurrency, help="closed loop")
    load.add_argument("--rate", type=float, default=d.rate, help="open loop: requests/s due")
    p.add_argument("--images-per-request", type=int, default=d.images_per_request)
    p.add_argument("--duration", type=float, default=d.duration, help="seconds measured")
    p.add_argument("--warmup", type=float, default=d.warmup, help="seconds before measuring")
    p.add_argument("--processes", type=int, default=d.processes, help="client processes")
    p.add_argument("--connections", type=int, default=d.connections, help="0: min(8, N)")
    p.add_argument("--png", action="store_true", help="send PNG files, not raw uint8 tensors")
    p.add_argument("--model", default=d.model, help="model name (needed for --mode v2)")
    p.add_argument("--shape", default="", help="C,H,W of the model input (default: ask)")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--timeout", type=float, default=d.timeout, help="deadline per request, s")
    p.add_argument("--v2-input", default=d.v2_input, help="V2 input tensor name")
    p.add_argument("--v2-output", default=d.v2_output, help="V2 output tensor name")
    add_access_options(p)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-': stdout)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> tuple[LoadConfig, str | None]:
    p = build_parser()
    a = p.parse_args(argv)
    for name in ("concurrency", "images_per_request", "processes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.duration <= 0 or a.warmup < 0 or a.rate < 0:
        p.error("--duration must be > 0; --warmup and --rate must be >= 0")
    _, token = access_from_args(p, a)  # checks the TLS flags; LoadConfig keeps the paths
    shape = tuple(int(x) for x in a.shape.split(",")) if a.shape else ()
    if shape and len(shape) != 3:
        p.error("--shape is C,H,W")
    cfg = LoadConfig(
        target=a.target,
        mode=a.mode,
        concurrency=a.concurrency,
        rate=a.rate,
        images_per_request=a.images_per_request,
        duration=a.duration,
        warmup=a.warmup,
        processes=a.processes,
        connections=a.connections,
        png=a.png,
        model=a.model,
        shape=shape,
        top_k=a.top_k,
        timeout=a.timeout,
        v2_input=a.v2_input,
        v2_output=a.v2_output,
        tls_ca=a.tls_ca,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_server_name=a.tls_server_name,
        auth_token=token,
    )
    if cfg.open_loop and cfg.concurrency < cfg.processes:
        cfg = replace(cfg, concurrency=cfg.processes)
    return cfg, a.json


def main(argv: Sequence[str] | None = None) -> int:
    cfg, json_path = config_from_args(argv)
    try:
        result = run_load(cfg)
    except grpc.RpcError as exc:
        print(f"cnn-bench: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"cnn-bench: {exc}", file=sys.stderr)
        return 1
    if json_path == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not result["errors"] else 1
