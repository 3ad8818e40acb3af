"""What load cnn-bench offers: `LoadConfig` (its defaults live here), the channels a run
opens, and the shape it is completed with from the server."""

from __future__ import annotations

from dataclasses import dataclass, replace

import grpc

from serving.client.channel import (
    TLS,
    bearer_metadata,
    channel_options,
    channel_target,
    connect,
    default_load_balancing,
)
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc

PREDICT = "/convserve.v1.Classifier/Predict"
PREDICT_STREAM = "/convserve.v1.Classifier/PredictStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# Predict, PredictStream, KServe V2 ModelInfer and ModelStreamInfer
MODES = ("unary", "stream", "v2", "v2-stream")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LoadConfig:
    """One load run; defaults live here and nowhere else."""

    target: str = "localhost:50051"  # host:port, or a comma-list (round_robin over them)
    mode: str = "unary"  # unary | stream | v2 | v2-stream
    concurrency: int = 8  # closed loop: requests in flight (all processes together)
    rate: float = 0.0  # open loop: requests/s due (all processes); 0 = closed loop
    images_per_request: int = 1
    duration: float = 10.0  # seconds measured
    warmup: float = 2.0  # seconds of the same load before measuring (discarded)
    processes: int = 1
    connections: int = 0  # HTTP/2 connections (all processes); 0 = min(8, concurrency)
    png: bool = False  # send encoded PNGs instead of raw uint8 tensors
    model: str = ""
    shape: tuple[int, ...] = ()  # (C, H, W); () = ask the server (GetModelInfo)
    top_k: int = 1
    timeout: float = 10.0  # per-request deadline, seconds
    v2_input: str = "images"
    v2_output: str = "probabilities"
    max_outstanding: int = 8192  # open loop: requests due but unanswered beyond this are shed
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    auth_token: str | None = None  # sent as `authorization: Bearer` metadata; never reported
    seed: int = 0

    @property
    def open_loop(self) -> bool:
        return self.rate > 0

    @property
    def v2(self) -> bool:
        return self.mode.startswith("v2")

    @property
    def streaming(self) -> bool:
        return self.mode.endswith("stream")

    @property
    def stream_method(self) -> str:
        return MODEL_STREAM_INFER if self.v2 else PREDICT_STREAM

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return bearer_metadata(self.auth_token) or None

    def n_connections(self) -> int:
        return self.connections or max(1, min(8, self.concurrency))


def _tls(cfg: LoadConfig) -> TLS | None:
    if cfg.tls_ca or cfg.tls_cert or cfg.tls_server_name:
        return TLS(cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_server_name)
    return None


def channel(cfg: LoadConfig, index: int, *, aio: bool = True) -> grpc.Channel | grpc.aio.Channel:
    """Channel `index` of a load run: each its own HTTP/2 connection."""
    # A comma-list of addresses or a dns:/// name (headless Service): round_robin over them.
    target = channel_target(cfg.target)
    opts = channel_options(default_load_balancing(target), _tls(cfg), MAX_MESSAGE_BYTES)
    # A private subchannel pool (and a distinct arg) makes each channel its own connection.
    opts += [("grpc.use_local_subchannel_pool", 1), ("convserve.bench_channel", index)]
    return connect(target, opts, _tls(cfg), aio=aio)


def resolve(cfg: LoadConfig) -> LoadConfig:
    """Fill in the image shape (and model name) from the server when not given."""
    if cfg.shape and (cfg.model or not cfg.v2):
        return cfg
    with channel(cfg, -1, aio=False) as ch:
        info = pb_grpc.ClassifierStub(ch).GetModelInfo(
            pb.ModelInfoRequest(model=cfg.model), timeout=cfg.timeout, metadata=cfg.metadata
        )
    shape = (info.input.channels, info.input.height, info.input.width)
    return replace(cfg, shape=shape, model=cfg.model or (info.name if cfg.v2 else ""))
