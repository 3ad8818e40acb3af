"""Client and AsyncClient: the convserve.v1.Classifier RPCs and grpc.health.v1, each written
once in `_ClientBase`. A method builds its call, `(stub method, request builder, response
parser, timeout)`, and hands it to `_invoke`: a blocking loop in Client, a coroutine in
AsyncClient (so `await aclient.predict(...)`). Retries follow one policy (serving.client.retry);
the two loops differ only in how they wait. The streaming methods are the clients' own."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.client.channel import (
    TLS,
    bearer_metadata,
    channel_options,
    channel_target,
    connect,
    default_load_balancing,
)
from serving.client.convert import (
    Explanation,
    Prediction,
    explain_request,
    predict_request,
    to_explanation,
    to_model_info,
    to_predictions,
)
from serving.client.retry import Attempts, PredictionError, Retry, Throttle
from serving.client.tracecontext import trace_metadata
from serving.proto.convserve.v1 import classifier_pb2 as pb
from serving.proto.convserve.v1 import classifier_pb2_grpc as pb_grpc

Build = Callable[[], Any]  # -> the request message
Parse = Callable[[Any], Any]  # the response message ->


class _ClientBase:
    _aio = False  # which grpc channel the client opens: grpc's or grpc.aio's

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
        self.throttle = Throttle(retry)  # shared by this client's calls
        # Health checks are probes: one waiting for a server to come up sees UNAVAILABLE many
        # times, which must not make the client throttle the calls that follow.
        self.probe_throttle = Throttle(replace(retry, throttle_k=None, retry_budget=None))
        self.metadata = tuple(metadata) + bearer_metadata(auth_token)
        if load_balancing is None:
            load_balancing = default_load_balancing(target)
        opts = channel_options(load_balancing, tls, max_message_bytes)
        self.channel = connect(self.target, opts, tls, aio=self._aio)
        self.stub = pb_grpc.ClassifierStub(self.channel)

    def _attempts(self, timeout: float | None, probe: bool = False) -> Attempts:
        throttle = self.probe_throttle if probe else self.throttle
        return Attempts(self.retry, timeout if timeout is not None else self.timeout, throttle)

    def _invoke(
        self, method: Any, build: Build, parse: Parse, timeout: float | None, probe: bool = False
    ) -> Any:
        """Send `build()` with `method` under the retry policy; `parse` the answer. The
        request is built here, inside the call, so that AsyncClient raises bad input when
        its call is awaited."""
        raise NotImplementedError

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """This client's metadata and the caller's trace context (serving.client.tracecontext)."""
        return self.metadata + trace_metadata()

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
        build = functools.partial(predict_request, images, top_k, model, version)
        return self._invoke(self.stub.Predict, build, to_predictions, timeout)

    def model_info(self, model: str = "", version: int = 0) -> dict[str, Any]:
        build = functools.partial(pb.ModelInfoRequest, model=model, version=version)
        return self._invoke(self.stub.GetModelInfo, build, to_model_info, None)

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

        patch_size/stride 0 use the server's defaults (a seventh of the image; stride = patch);
        target_class None tracks the top-1 class. Costs the server 1 + P forward passes.
        """
        build = functools.partial(
            explain_request,
            image,
            model,
            version,
            patch_size=patch_size,
            stride=stride,
            target_class=target_class,
            render_png=render_png,
            activation_stage=activation_stage,
        )
        return self._invoke(self.stub.Explain, build, to_explanation, timeout)

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        check = health_pb2_grpc.HealthStub(self.channel).Check
        build = functools.partial(health_pb2.HealthCheckRequest, service=service)
        return self._invoke(check, build, _status_name, None, probe=True)


def _status_name(resp: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class Client(_ClientBase):
    """Synchronous client. `timeout` is each call's deadline in seconds (retries included).

    `target` is `host:port`, `dns:///name:port` (with `load_balancing="round_robin"` to
    spread calls over every address of a headless Service) or a list of `ip:port`.
    `tls=TLS(ca=..., cert=..., key=...)` connects over TLS (mutual with cert/key), and
    `auth_token=` sends `authorization: Bearer <token>` with every call.
    """

    def _invoke(
        self, method: Any, build: Build, parse: Parse, timeout: float | None, probe: bool = False
    ) -> Any:
        request, tries, metadata = build(), self._attempts(timeout, probe), self._call_metadata()
        while True:
            try:
                response = method(request, timeout=tries.timeout(), metadata=metadata)
            except grpc.RpcError as exc:
                time.sleep(tries.backoff(exc))
            else:
                tries.succeeded()
                return parse(response)

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
        reqs = (predict_request(b, top_k, model, version) for b in batches)
        call = self.stub.PredictStream(
            reqs, timeout=timeout or self.timeout, metadata=self._call_metadata()
        )
        try:
            for resp in call:
                yield to_predictions(resp)
        except grpc.RpcError as exc:
            raise PredictionError(exc.code(), exc.details()) from None
        finally:
            call.cancel()  # a caller that stops early must not hold the stream open

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The asyncio twin of Client (same arguments, same results, awaitable)."""

    _aio = True

    if TYPE_CHECKING:  # the shared methods, as a type checker must see them here: awaited

        async def predict(  # type: ignore[override]
            self,
            images: Sequence[Any],
            top_k: int = 1,
            *,
            model: str = "",
            version: int = 0,
            timeout: float | None = None,
        ) -> list[Prediction]: ...

        async def model_info(  # type: ignore[override]
            self, model: str = "", version: int = 0
        ) -> dict[str, Any]: ...

        async def explain(self, image: Any, **kw: Any) -> Explanation: ...  # type: ignore[override]

        async def health(self, service: str = "") -> str: ...  # type: ignore[override]

    async def _invoke(
        self, method: Any, build: Build, parse: Parse, timeout: float | None, probe: bool = False
    ) -> Any:
        request, tries, metadata = build(), self._attempts(timeout, probe), self._call_metadata()
        while True:
            try:
                response = await method(request, timeout=tries.timeout(), metadata=metadata)
            except grpc.RpcError as exc:
                await asyncio.sleep(tries.backoff(exc))
            else:
                tries.succeeded()
                return parse(response)

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
                    yield predict_request(b, top_k, model, version)
            else:
                for b in batches:  # type: ignore[union-attr]
                    yield predict_request(b, top_k, model, version)

        call = self.stub.PredictStream(
            reqs(), timeout=timeout or self.timeout, metadata=self._call_metadata()
        )
        try:
            async for resp in call:
                yield to_predictions(resp)
        except grpc.RpcError as exc:
            raise PredictionError(exc.code(), exc.details()) from None
        finally:
            call.cancel()  # a caller that stops early must not hold the stream open

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
