"""The HTTP front end of one worker, on the worker's event loop beside gRPC: KServe V2 REST
(serving.http.inference), convserve.v1 as REST (serving.http.classifier) and the try-it page.

aiohttp serves it: it runs on an asyncio loop it is handed (uvloop included), so the data
plane, the batcher and the metrics are the ones gRPC uses, with no second loop or thread;
its HTTP/1.1 parser is C (llhttp); it brings 7 small pure-Python or C-extension packages
and no web framework. uvicorn would need an ASGI framework on top and a server object that
owns the loop (its `Server.serve()` can run inside ours, but its lifespan and signal
handling are its own); starlette/FastAPI add validation layers per request that a converter
of four routes does not need. Throughput measured in BENCHMARKS.md ("HTTP").

Every call passes one decorator (serving.http.status.endpoint): token, admission, the error
table, metrics with protocol="http".
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from serving import v2
from serving.auth import UNAUTHENTICATED, Gate, TokenTable, bearer_token
from serving.dataplane import DataPlane
from serving.http import classifier, inference
from serving.http.status import Refused, endpoint, error, json_response, read_json
from serving.http.tls import ServerContext
from serving.metrics import Metrics
from serving.settings import ServerSettings

KEEPALIVE_S = 75.0  # an idle keep-alive connection is closed after this (nginx's default)
PAGE = "page.html"
_json = json_response


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


def _version_number(request: web.Request) -> int | None:
    """The path's version as the repository's number (None: the latest)."""
    return v2.version_number(_version(request))


class Handlers:
    """Every route's handler: a few lines of conversion around one data plane call."""

    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        gate: Gate | None,
        page: bytes | None,
    ):
        self.plane = plane
        self.metrics = metrics
        self.gate = gate
        self.page = page

    def authorize(self, request: web.Request, group: str) -> None:
        if self.gate is None:
            return
        refusal = self.gate.refusal(group, bearer_token(request.headers.get("Authorization")))
        if refusal is None:
            return
        self.gate.refused(f"{request.method} {request.path}", group, refusal)
        if refusal == UNAUTHENTICATED:
            raise Refused(401, "a valid bearer token is required")
        raise Refused(403, "this token does not grant this call")

    # -- health and metadata (KServe V2) -----------------------------------------------
    @endpoint("ServerLive", "health")
    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    @endpoint("ServerReady", "health", admit=False)
    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.ready
        return _json({"ready": ready}, status=200 if ready else 503)

    @endpoint("ServerMetadata", "metadata")
    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(
            {"name": v2.SERVER_NAME, "version": v2.SERVER_VERSION, "extensions": v2.EXTENSIONS}
        )

    @endpoint("ModelMetadata", "metadata")
    async def model_metadata(self, request: web.Request) -> web.Response:
        m = self.plane.model_metadata(request.match_info["model"], _version_number(request))
        return _json(inference.metadata(m))

    @endpoint("ModelReady", "metadata")
    async def model_ready(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        ready = self.plane.model_ready(name, _version(request))
        return _json({"name": name, "ready": ready}, status=200 if ready else 503)

    @endpoint("RepositoryIndex", "metadata")
    async def repository_index(self, request: web.Request) -> web.Response:
        doc = read_json(await request.read() or b"{}", "the index request")
        ready = isinstance(doc, dict) and doc.get("ready") is True
        index = [
            {"name": name, "version": "" if v is None else str(v), "state": state, "reason": why}
            for name, v, state, why in self.plane.index()
            if state == "READY" or not ready
        ]
        return _json(index)

    # -- inference (KServe V2) ---------------------------------------------------------
    @endpoint("ModelInfer", "inference", admit=False)
    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        header, binary = inference.split_body(body, request.headers.get(inference.HEADER_LENGTH))
        doc = read_json(header, "the inference header")
        ask, binary_names, deadline = inference.infer_request(
            doc, binary, request.match_info["model"], _version(request)
        )
        self.plane.admit(deadline)
        answer = await self.plane.infer(ask, deadline)
        data, headers = inference.infer_response(answer, binary_names)
        return web.Response(body=data, headers=headers)

    # -- convserve.v1 as REST ----------------------------------------------------------
    @endpoint("GetModelInfo", "metadata")
    async def models(self, request: web.Request) -> web.Response:
        names: dict[str, list[int]] = {}
        for name, v, state, _ in self.plane.index():
            if state == "READY" and v is not None:
                names.setdefault(name, []).append(v)
        return _json({"models": [{"name": n, "versions": vs} for n, vs in names.items()]})

    @endpoint("GetModelInfo", "metadata")
    async def model_info(self, request: web.Request) -> web.Response:
        info = self.plane.model_info(request.match_info["model"], _version_number(request))
        return _json(classifier.model_info(info))

    @endpoint("Predict", "inference")
    async def predict(self, request: web.Request) -> web.Response:
        top_k = classifier.query_int(request.query, "top_k", 1) or 0
        body = await request.read()
        c = await self.plane.predict(
            request.match_info["model"],
            _version_number(request),
            [classifier.image(body)],
            top_k,
            None,
        )
        return _json(classifier.classification(c))

    @endpoint("Explain", "inference")
    async def explain(self, request: web.Request) -> web.Response:
        ask = classifier.explain_request(request.query, await request.read())
        ex = await self.plane.explain(
            request.match_info["model"], _version_number(request), ask, None
        )
        return _json(classifier.explanation(ex))

    # -- the page ----------------------------------------------------------------------
    async def index_page(self, request: web.Request) -> web.Response:
        # Static, holding no data: served without a token; every call it makes needs one
        # when tokens are on (it asks for it).
        assert self.page is not None
        return web.Response(
            body=self.page,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                "style-src 'unsafe-inline'; script-src 'unsafe-inline'",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method) in the protocol's error form."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(
            exc.status,
            exc.reason,
            {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
        )


def routes(h: Handlers) -> list[web.RouteDef]:
    table = [
        web.get("/v2/health/live", h.live),
        web.get("/v2/health/ready", h.ready),
        web.get("/v2", h.server_metadata),
        web.post("/v2/repository/index", h.repository_index),
        web.get("/v1/models", h.models),
    ]
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        table += [
            web.get(base, h.model_metadata),
            web.get(f"{base}/ready", h.model_ready),
            web.post(f"{base}/infer", h.infer),
        ]
    for base in ("/v1/models/{model}", "/v1/models/{model}/versions/{version}"):
        table += [
            web.get(base, h.model_info),
            web.post(f"{base}/predict", h.predict),
            web.post(f"{base}/explain", h.explain),
        ]
    if h.page is not None:
        table.append(web.get("/", h.index_page))
    return table


def page() -> bytes:
    return resources.files("serving.http").joinpath(PAGE).read_bytes()


@dataclass
class HttpFront:
    """One worker's HTTP server, bound and not yet listening."""

    runner: web.AppRunner
    sock: socket.socket
    port: int
    tls: ServerContext | None
    _site: web.SockSite | None = None

    async def start(self) -> None:
        context = self.tls.context if self.tls else None
        self._site = web.SockSite(self.runner, self.sock, ssl_context=context, backlog=1024)
        await self._site.start()

    async def stop(self) -> None:
        """Stop listening, let running calls finish (up to the drain timeout), close."""
        await self.runner.cleanup()
        self.sock.close()


def bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only, on Linux
    if reuse_port:  # workers of one server, on the port the parent reserved
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OSError(f"could not bind HTTP {host}:{port} ({exc.strerror})") from None
    sock.setblocking(False)
    return sock


async def build(
    settings: ServerSettings,
    plane: DataPlane,
    metrics: Metrics,
    tls: ServerContext | None,
    tokens: TokenTable | None,
) -> HttpFront:
    """The HTTP port bound (not listening: `start()` listens)."""
    gate = None
    if tokens is not None:
        gate = Gate(tokens, frozenset(settings.open_groups), metrics.auth_failures)
    handlers = Handlers(plane, metrics, gate, page() if settings.ui else None)
    app = web.Application(client_max_size=settings.max_message_bytes, middlewares=[json_errors])
    app.add_routes(routes(handlers))
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.drain_timeout,
        keepalive_timeout=KEEPALIVE_S,
    )
    await runner.setup()
    try:
        sock = bind(settings.host, settings.http_port, settings.reuse_port)
    except OSError:
        await runner.cleanup()
        raise
    return HttpFront(runner, sock, sock.getsockname()[1], tls)
