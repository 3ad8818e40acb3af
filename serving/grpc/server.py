"""The gRPC front end of one worker: both services over the data plane, grpc.health.v1,
reflection, token auth and TLS, and an optional plaintext port that answers health alone."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from serving.auth import TokenTable
from serving.dataplane import DataPlane
from serving.grpc.auth import AuthInterceptor
from serving.grpc.classifier import ClassifierServicer
from serving.grpc.inference import InferenceServicer
from serving.grpc.status import TolerantRegistration
from serving.grpc.tls import CertificateStore
from serving.metrics import Metrics
from serving.proto.convserve.v1 import classifier_pb2, classifier_pb2_grpc
from serving.proto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from serving.settings import ServerSettings

SERVICE_NAMES = (
    classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
PENDING_CALLS_LIMIT = 20_000  # ~20-80 MB of typical requests (1-4 KB) waiting in grpc


def grpc_options(settings: ServerSettings) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # A stale server on the same port must not silently take our traffic; only
        # workers of one server share a port (the parent reserves it).
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        # Calls that reached grpc but not yet our handlers (the event loop is behind). Past
        # grpc's defaults (1000 soft, 3000 hard) grpc sheds them with CANCELLED, which
        # clients take for their own cancellation and retry (serving.client does); under
        # `make overload` that was a third of all answers. Below this limit the excess gets
        # the batcher's RESOURCE_EXHAUSTED or its deadline's DEADLINE_EXCEEDED; the limit
        # only caps memory. Cost measured in RELIABILITY.md (less goodput under overload).
        ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_LIMIT),
        *_connection_age_options(settings),
    ]


def _connection_age_options(settings: ServerSettings) -> list[tuple[str, int | str]]:
    if settings.max_connection_age <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
    ]


@dataclass
class GrpcFront:
    """One worker's gRPC servers, bound and not yet started."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    health_server: grpc.aio.Server | None  # --health-port: probes only, plaintext

    @property
    def servers(self) -> list[grpc.aio.Server]:
        return [self.server] + ([self.health_server] if self.health_server else [])

    async def start(self) -> None:
        for s in self.servers:
            await s.start()

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let admitted ones finish (up to `grace` s), close."""
        await self.server.stop(grace=grace)
        if self.health_server is not None:
            await self.health_server.stop(grace=1.0)


async def build(
    settings: ServerSettings,
    plane: DataPlane,
    metrics: Metrics,
    certificates: CertificateStore | None,
    tokens: TokenTable | None,
) -> GrpcFront:
    """Both services and health on the gRPC port, bound; health says NOT_SERVING until told."""
    interceptors = None  # no token file: no interceptor, so unauthenticated serving pays nothing
    if tokens is not None:
        interceptors = [AuthInterceptor(tokens, frozenset(settings.open_groups), metrics)]
    server = grpc.aio.server(interceptors=interceptors, options=grpc_options(settings))
    # Undecodable request bytes reach the servicers, which answer INVALID_ARGUMENT.
    ours = TolerantRegistration(server)
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(plane, metrics), ours)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(plane, metrics, settings.log_format), ours
    )
    health = HealthServicer()  # it starts out SERVING for "": say NOT_SERVING until loaded
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (*SERVICE_NAMES, HEALTH_SERVICE, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    creds = certificates.credentials() if certificates else None
    port = bind(server, settings.host, settings.port, creds)
    health_server = None
    if settings.health_port:
        # Probes cannot present client certificates or tokens: the same HealthServicer
        # (so the same status) alone on a plaintext port of its own.
        reuse = ("grpc.so_reuseport", 1 if settings.reuse_port else 0)
        health_server = grpc.aio.server(options=[reuse])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        bind(health_server, settings.host, settings.health_port, None)
    front = GrpcFront(server, port, health, health_server)
    await front.set_serving(False)
    return front


def bind(
    server: grpc.aio.Server, host: str, port: int, creds: grpc.ServerCredentials | None
) -> int:
    address = f"{_host(host)}:{port}"
    try:
        if creds is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, creds)
    except RuntimeError:  # grpc reports a failed bind this way
        bound = 0
    if bound == 0:
        raise OSError(f"could not bind {address} (in use, or not an address of this host)")
    return bound


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
