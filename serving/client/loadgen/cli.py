"""The `cnn-bench` command: LoadConfig's flags, one run, the table (and JSON) it reports."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import grpc

from serving.client.loadgen.config import LoadConfig
from serving.client.loadgen.report import format_table
from serving.client.loadgen.runner import run_load
from serving.options import parse


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-': stdout)")


def config_from_args(argv: Sequence[str] | None = None) -> tuple[LoadConfig, str | None]:
    """The run cnn-bench's command line asks for, and where its JSON report goes."""
    cfg, args = parse(
        LoadConfig,
        argv,
        prog="cnn-bench",
        description="Load a convserve (or KServe V2) server over gRPC and report requests/s, "
        "images/s, latency percentiles and errors by status code.",
        env=False,  # CONVSERVE_AUTH_TOKEN alone (ClientAccess)
        extra=_output_flags,
    )
    if cfg.open_loop and cfg.concurrency < cfg.processes:
        cfg = replace(cfg, concurrency=cfg.processes)
    return cfg, args.json


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
