"""What load cnn-bench offers: `LoadConfig`, its settings (each flag's default, help and
bounds declared here and nowhere else), and the shape it is completed with from the server."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import grpc

from serving.client.access import ClientAccess
from serving.client.channel import (
    bearer_metadata,
    channel_options,
    channel_target,
    connect,
    default_load_balancing,
)
from serving.options import SettingsError, nested, option, validate
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc

PREDICT = "/convserve.v1.Classifier/Predict"
PREDICT_STREAM = "/convserve.v1.Classifier/PredictStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
# Predict, PredictStream, KServe V2 ModelInfer and ModelStreamInfer
MODES = ("unary", "stream", "v2", "v2-stream")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",")) if text else ()
    except ValueError:
        raise argparse.ArgumentTypeError(f"is C,H,W, not {text!r}") from None


@dataclass(frozen=True)
class LoadConfig:
    """One load run; defaults live here and nowhere else."""

    target: str = option(
        "localhost:50051",
        "HOST:PORT, dns:///NAME:PORT or a comma-list of IP:PORT (both round_robin)",
    )
    mode: str = option(
        "unary", "Predict, PredictStream, V2 ModelInfer, V2 ModelStreamInfer", choices=MODES
    )
    # closed loop: requests in flight (all processes together)
    concurrency: int = option(8, "closed loop", minimum=1, exclusive="load")
    # open loop: requests/s due (all processes); 0 = closed loop
    rate: float = option(0.0, "open loop: requests/s due", minimum=0, exclusive="load")
    images_per_request: int = option(1, "images in each request", minimum=1)
    duration: float = option(10.0, "seconds measured")
    warmup: float = option(2.0, "seconds before measuring", minimum=0)  # same load, discarded
    processes: int = option(1, "client processes", minimum=1)
    connections: int = option(0, "0: min(8, N)")  # HTTP/2 connections (all processes)
    png: bool = option(False, "send PNG files, not raw uint8 tensors")
    model: str = option("", "model name (needed for --mode v2)")
    shape: tuple[int, ...] = option((), "C,H,W of the model input (default: ask)", parse=_shape)
    top_k: int = option(1, "classes in each answer")
    timeout: float = option(10.0, "deadline per request, s")
    v2_input: str = option("images", "V2 input tensor name")
    v2_output: str = option("probabilities", "V2 output tensor name")
    max_outstanding: int = option(
        8192, "open loop: requests due but unanswered beyond this are shed", cli=False
    )
    access: ClientAccess = nested(ClientAccess)  # TLS and token: never reported
    seed: int = option(0, "seed of the synthetic images", cli=False)

    def __post_init__(self) -> None:
        validate(self)
        if self.duration <= 0:
            raise SettingsError("--duration must be > 0")
        if self.shape and len(self.shape) != 3:
            raise SettingsError("--shape is C,H,W")

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
        return bearer_metadata(self.access.token) or None

    def n_connections(self) -> int:
        return self.connections or max(1, min(8, self.concurrency))


def channel(cfg: LoadConfig, index: int, *, aio: bool = True) -> grpc.Channel | grpc.aio.Channel:
    """Channel `index` of a load run: each its own HTTP/2 connection."""
    # A comma-list of addresses or a dns:/// name (headless Service): round_robin over them.
    target = channel_target(cfg.target)
    opts = channel_options(default_load_balancing(target), cfg.access.tls, MAX_MESSAGE_BYTES)
    # A private subchannel pool (and a distinct arg) makes each channel its own connection.
    opts += [("grpc.use_local_subchannel_pool", 1), ("convserve.bench_channel", index)]
    return connect(target, opts, cfg.access.tls, aio=aio)


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
