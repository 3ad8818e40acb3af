"""A Python client for convserve.v1.Classifier and the `cnn-predict` command.

    from serving.client import Client
    with Client("localhost:50051") as c:
        for p in c.predict(["shoe.png", "shirt.png"], top_k=3):
            print(p.label, p.probability)

Images may be file paths, encoded bytes, PIL images or numpy arrays (uint8 or float32
pixel values 0..255, shaped (H, W), (C, H, W) or (H, W, C)).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class PredictionError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Prediction:
    classes: tuple[ClassScore, ...]
    model: str
    version: int

    @property
    def label(self) -> str:
        return self.classes[0].label

    @property
    def index(self) -> int:
        return self.classes[0].index

    @property
    def probability(self) -> float:
        return self.classes[0].probability


def to_image(image: Any) -> pb.Image:
    """A path, bytes, PIL image or numpy array -> the wire Image message."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, str | Path):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes | bytearray | memoryview):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        return _array_image(image)
    if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return pb.Image(encoded=buf.getvalue())
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def _array_image(a: np.ndarray) -> pb.Image:
    if a.ndim == 3 and a.shape[0] not in (1, 3) and a.shape[-1] in (1, 3):
        a = a.transpose(2, 0, 1)  # HWC -> CHW
    if a.ndim not in (2, 3):
        raise ValueError(f"an image array must be 2-D or 3-D, got shape {a.shape}")
    if a.dtype == np.uint8:
        dtype = pb.UINT8
    elif a.dtype == np.float32:
        dtype = pb.FLOAT32
        a = a.astype("<f4", copy=False)
    else:
        raise ValueError(f"image arrays must be uint8 or float32, got {a.dtype}")
    a = np.ascontiguousarray(a)
    return pb.Image(tensor=pb.Tensor(dtype=dtype, shape=list(a.shape), data=a.tobytes()))


def _prediction(resp: pb.PredictResponse) -> list[Prediction]:
    return [
        Prediction(
            tuple(ClassScore(c.index, c.label, c.probability) for c in p.classes),
            resp.model,
            resp.version,
        )
        for p in resp.predictions
    ]


@dataclass(frozen=True)
class TLS:
    """TLS settings: the CA that signed the server's certificate, and for mutual TLS the
    client's own certificate and key (PEM files)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None  # override the name checked in the server certificate

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


def read_token_file(path: str | Path) -> str:
    """The first token in a file (blank lines and `# comments` skipped; a server-style
    `TOKEN groups` line gives its TOKEN)."""
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            return fields[0]
    raise ValueError(f"{path}: holds no token")


def add_access_options(p: argparse.ArgumentParser) -> None:
    """The TLS and token flags shared by cnn-predict and cnn-bench."""
    p.add_argument("--tls-ca", help="CA certificate (PEM) that signed the server's certificate")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--tls-server-name", help="name to check in the server's certificate")
    p.add_argument(
        "--auth-token",
        default=os.environ.get("CONVSERVE_AUTH_TOKEN"),
        help="bearer token sent with every call [CONVSERVE_AUTH_TOKEN] (prefer "
        "--auth-token-file: command lines are visible to other users)",
    )
    p.add_argument("--auth-token-file", help="file holding the bearer token")


def access_from_args(
    p: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[TLS | None, str | None]:
    """(TLS settings or None for plaintext, bearer token or None) from `add_access_options`."""
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_server_name:
        tls = TLS(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    token = args.auth_token
    if args.auth_token_file:
        try:
            token = read_token_file(args.auth_token_file)
        except (OSError, ValueError) as exc:
            p.error(f"--auth-token-file: {exc}")
    return tls, token


SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def channel_target(target: str | Sequence[str]) -> str:
    """`host:port`, a `dns:///name:port` target, or a list (or comma-list) of `ip:port`."""
    if isinstance(target, str):
        if "," not in target or target.startswith(SCHEMES):
            return target
        target = target.split(",")
    return "ipv4:" + ",".join(target)


def default_load_balancing(target: str | Sequence[str]) -> str | None:
    """round_robin where the target names several servers: a list of addresses, or a
    `dns:///` name (a headless Service resolves to every ready pod); else gRPC's pick_first."""
    resolved = channel_target(target)
    return "round_robin" if resolved.startswith(("dns:", "ipv4:", "ipv6:")) else None


def channel_options(
    load_balancing: str | None, tls: TLS | None, max_message_bytes: int
) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if load_balancing:
        config = {"loadBalancingConfig": [{load_balancing: {}}]}
        opts.append(("grpc.service_config", json.dumps(config)))
    if tls is not None and tls.server_name:
        opts.append(("grpc.ssl_target_name_override", tls.server_name))
    return opts


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents `token` to a server run with --auth-token-file."""
    return (("authorization", f"Bearer {token}"),) if token else ()


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


@dataclass(frozen=True)
class Retry:
    """Retries with full-jitter exponential backoff, on the statuses that say the request
    was not processed and another try may succeed: UNAVAILABLE, and CANCELLED, which this
    client never asks for on a unary call; a replica shutting down (SIGTERM) cancels calls
    its transport accepted but its handlers had not started."""

    attempts: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))


def _request(images: Sequence[Any], top_k: int, model: str, version: int) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model, version=version, top_k=top_k, images=[to_image(i) for i in images]
    )


def _info(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "versions": list(info.versions),
        "labels": list(info.labels),
        "input": {
            "channels": info.input.channels,
            "height": info.input.height,
            "width": info.input.width,
        },
        "execution_provider": info.execution_provider,
        "requested_device": info.requested_device,
        "max_batch_size": info.max_batch_size,
        "manifest": json.loads(info.manifest_json or "{}"),
    }


@dataclass(frozen=True)
class Explanation:
    """What Classifier.Explain answered for one image."""

    model: str
    version: int
    classes: tuple[ClassScore, ...]  # every class, most probable first
    target_class: int  # the class the heatmap tracks
    heatmap: np.ndarray  # (rows, cols) float32: probability drop when each patch is hidden
    forward_passes: int
    overlay_png: bytes  # empty unless render_png was asked for
    activations: np.ndarray | None  # (C, H, W) float32 of activation_stage, if asked

    @property
    def label(self) -> str:
        return self.classes[0].label


def _tensor(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape)).copy()


def _explain_request(image: Any, model: str, version: int, **kw: Any) -> pb.ExplainRequest:
    target = kw.pop("target_class", None)
    return pb.ExplainRequest(
        model=model,
        version=version,
        image=to_image(image),
        target_class=target or 0,
        has_target_class=target is not None,
        **kw,
    )


def _explanation(resp: pb.ExplainResponse) -> Explanation:
    return Explanation(
        model=resp.model,
        version=resp.version,
        classes=tuple(ClassScore(c.index, c.label, c.probability) for c in resp.prediction.classes),
        target_class=resp.target_class,
        heatmap=_tensor(resp.heatmap),
        forward_passes=resp.forward_passes,
        overlay_png=resp.overlay_png,
        activations=_tensor(resp.activations[0]) if resp.activations else None,
    )


class _Base:
    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float | None = 30.0,
        tls: TLS | None = None,
        retry: Retry = Retry(),
        load_balancing: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        metadata: Sequence[tuple[str, str]] = (),
        auth_token: str | None = None,
    ):
        self.target = channel_target(target)
        self.timeout = timeout
        self.retry = retry
        self.metadata = tuple(metadata) + bearer_metadata(auth_token)
        if load_balancing is None:
            load_balancing = default_load_balancing(target)
        self._opts = channel_options(load_balancing, tls, max_message_bytes)
        self._creds = tls.credentials() if tls is not None else None

    def _deadline(self, timeout: float | None) -> float | None:
        t = timeout if timeout is not None else self.timeout
        return None if t is None else time.monotonic() + t

    def _attempt_timeout(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise PredictionError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
        return left

    def _should_retry(self, exc: grpc.RpcError, attempt: int, deadline: float | None) -> float:
        """Seconds to wait before the next attempt, or -1 to give up."""
        if exc.code() not in RETRYABLE or attempt + 1 >= self.retry.attempts:
            return -1
        wait = self.retry.delay(attempt)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return -1
        return wait


class Client(_Base):
    """Synchronous client. `timeout` is each call's deadline in seconds (retries included).

    `target` is `host:port`, `dns:///name:port` (with `load_balancing="round_robin"` to
    spread calls over every address of a headless Service) or a list of `ip:port`.
    `tls=TLS(ca=..., cert=..., key=...)` connects over TLS (mutual with cert/key), and
    `auth_token=` sends `authorization: Bearer <token>` with every call.
    """

    def __init__(self, target: str | Sequence[str], **kw: Any):
        super().__init__(target, **kw)
        if self._creds is None:
            self.channel = grpc.insecure_channel(self.target, options=self._opts)
        else:
            self.channel = grpc.secure_channel(self.target, self._creds, options=self._opts)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(
                    request, timeout=self._attempt_timeout(deadline), metadata=self.metadata
                )
            except grpc.RpcError as exc:
                wait = self._should_retry(exc, attempt, deadline)
                if wait < 0:
                    raise PredictionError(exc.code(), exc.details()) from None
                time.sleep(wait)
                attempt += 1

    def predict(
        self,
        images: Sequence[Any],
        top_k: int = 1,
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
    ) -> list[Prediction]:
        """Classify `images` in one request; one Prediction per image, in order."""
        req = _request(images, top_k, model, version)
        return _prediction(self._call(self.stub.Predict, req, timeout))

    def predict_stream(
        self,
        batches: Iterable[Sequence[Any]],
        top_k: int = 1,
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
    ) -> Iterator[list[Prediction]]:
        """Many requests over one stream: yields one list of predictions per batch, in order."""
        reqs = (_request(b, top_k, model, version) for b in batches)
        call = self.stub.PredictStream(
            reqs, timeout=timeout or self.timeout, metadata=self.metadata
        )
        try:
            for resp in call:
                yield _prediction(resp)
        except grpc.RpcError as exc:
            raise PredictionError(exc.code(), exc.details()) from None
        finally:
            call.cancel()  # a caller that stops early must not hold the stream open

    def model_info(self, model: str = "", version: int = 0) -> dict[str, Any]:
        req = pb.ModelInfoRequest(model=model, version=version)
        return _info(self._call(self.stub.GetModelInfo, req, None))

    def explain(
        self,
        image: Any,
        *,
        patch_size: int = 0,
        stride: int = 0,
        target_class: int | None = None,
        render_png: bool = False,
        activation_stage: str = "",
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
    ) -> Explanation:
        """Occlusion heatmap (and optionally a stage's activation maps) for one image.

        patch_size/stride 0 use the server's defaults (a quarter of the image; stride = patch);
        target_class None tracks the top-1 class. Costs the server 1 + P forward passes.
        """
        req = _explain_request(
            image,
            model,
            version,
            patch_size=patch_size,
            stride=stride,
            target_class=target_class,
            render_png=render_png,
            activation_stage=activation_stage,
        )
        return _explanation(self._call(self.stub.Explain, req, timeout))

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        req = health_pb2.HealthCheckRequest(service=service)
        resp = self._call(stub.Check, req, None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio twin of Client (same arguments, same results, awaitable)."""

    def __init__(self, target: str | Sequence[str], **kw: Any):
        super().__init__(target, **kw)
        if self._creds is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=self._opts)
        else:
            self.channel = grpc.aio.secure_channel(self.target, self._creds, options=self._opts)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(
                    request, timeout=self._attempt_timeout(deadline), metadata=self.metadata
                )
            except grpc.RpcError as exc:
                wait = self._should_retry(exc, attempt, deadline)
                if wait < 0:
                    raise PredictionError(exc.code(), exc.details()) from None
                await asyncio.sleep(wait)
                attempt += 1

    async def predict(
        self,
        images: Sequence[Any],
        top_k: int = 1,
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
    ) -> list[Prediction]:
        req = _request(images, top_k, model, version)
        return _prediction(await self._call(self.stub.Predict, req, timeout))

    async def predict_stream(
        self,
        batches: Iterable[Sequence[Any]] | AsyncIterator[Sequence[Any]],
        top_k: int = 1,
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[list[Prediction]]:
        async def reqs() -> AsyncIterator[pb.PredictRequest]:
            if hasattr(batches, "__aiter__"):
                async for b in batches:  # type: ignore[union-attr]
                    yield _request(b, top_k, model, version)
            else:
                for b in batches:  # type: ignore[union-attr]
                    yield _request(b, top_k, model, version)

        call = self.stub.PredictStream(
            reqs(), timeout=timeout or self.timeout, metadata=self.metadata
        )
        try:
            async for resp in call:
                yield _prediction(resp)
        except grpc.RpcError as exc:
            raise PredictionError(exc.code(), exc.details()) from None
        finally:
            call.cancel()  # a caller that stops early must not hold the stream open

    async def explain(
        self, image: Any, *, model: str = "", version: int = 0, **kw: Any
    ) -> Explanation:
        """`Client.explain`, awaited (same keyword options)."""
        timeout = kw.pop("timeout", None)
        req = _explain_request(image, model, version, **kw)
        return _explanation(await self._call(self.stub.Explain, req, timeout))

    async def model_info(self, model: str = "", version: int = 0) -> dict[str, Any]:
        req = pb.ModelInfoRequest(model=model, version=version)
        return _info(await self._call(self.stub.GetModelInfo, req, None))

    async def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ----------------------------------------------------------------------------- cnn-predict
def find_images(paths: Iterable[str]) -> list[Path]:
    """Files as given, and image files under directories (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def _truth(path: Path, labels: Sequence[str]) -> int | None:
    """A folder named after a class (its index, or its label with '/' as '-') is the truth."""
    name = path.parent.name
    for i, label in enumerate(labels):
        if name == str(i) or name == label.replace("/", "-"):
            return i
    return None


def predict_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cnn-predict", description="Classify images with a server.")
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT of cnn-serve")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--batch-size", type=int, default=64, help="images per request")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--model", default="", help="model name (when the server serves several)")
    add_access_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--explain",
        metavar="DIR",
        type=Path,
        help="also write an occlusion overlay PNG per image into DIR (1 + P passes each)",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or directories")
    args = p.parse_args(argv)
    tls, token = access_from_args(p, args)
    try:
        files = find_images(args.paths)
    except FileNotFoundError as exc:
        print(f"cnn-predict: {exc}", file=sys.stderr)
        return 2
    if not files:
        print("cnn-predict: no images found", file=sys.stderr)
        return 2
    correct = known = 0
    show = not args.no_progress and len(files) > args.batch_size and sys.stderr.isatty()
    bar = tqdm(total=len(files), unit="img", disable=not show, file=sys.stderr)
    with Client(args.server, timeout=args.timeout, tls=tls, auth_token=token) as client, bar:
        try:
            labels = client.model_info(args.model)["labels"]
            for start in range(0, len(files), args.batch_size):
                chunk = files[start : start + args.batch_size]
                preds = client.predict(chunk, args.top_k, model=args.model)
                for f, pred in zip(chunk, preds, strict=True):
                    _print(f, pred, args.json)
                    truth = _truth(f, labels)
                    if truth is not None:
                        known += 1
                        correct += pred.index == truth
                bar.update(len(chunk))
            if args.explain:
                _write_explanations(client, files, args.explain, args.model)
        except PredictionError as exc:
            print(f"cnn-predict: {exc}", file=sys.stderr)
            return 1
    if known:
        print(
            f"accuracy {correct / known:.4f} ({correct}/{known} images whose folder names "
            "their class)",
            file=sys.stderr,
        )
    return 0


def _write_explanations(client: Client, files: Sequence[Path], out: Path, model: str) -> None:
    """One `<stem>.explain.png` overlay per image (a numbered suffix when stems repeat)."""
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for f in files:
        name, n = f"{f.stem}.explain.png", 1
        while name in taken:
            n += 1
            name = f"{f.stem}-{n}.explain.png"
        taken.add(name)
        ex = client.explain(f, render_png=True, model=model)
        (out / name).write_bytes(ex.overlay_png)
    print(f"explanations: {len(files)} overlay PNGs in {out}", file=sys.stderr)


def _print(path: Path, pred: Prediction, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "model": pred.model,
                    "version": pred.version,
                    "classes": [
                        {"index": c.index, "label": c.label, "probability": round(c.probability, 6)}
                        for c in pred.classes
                    ],
                }
            )
        )
    else:
        others = ", ".join(f"{c.label} {c.probability:.3f}" for c in pred.classes[1:])
        print(f"{path}\t{pred.label}\t{pred.probability:.4f}" + (f"\t({others})" if others else ""))


if __name__ == "__main__":
    sys.exit(predict_main())
