"""Token auth: `authorization: Bearer <token>` checked against a token file, per endpoint group.

The token file holds one token per line, optionally followed by the groups it grants:

    # comment
    s3cr3t-for-the-web-app   inference,metadata
    s3cr3t-for-ops                               (no groups: every group)

Every method belongs to one group (METHOD_GROUPS / SERVICE_GROUPS); a method in no group is
refused to every token (fail closed). Groups listed in `--open-groups` need no token.
A missing or unknown token is UNAUTHENTICATED; a known token outside its groups is
PERMISSION_DENIED. Tokens are compared as SHA-256 digests with `hmac.compare_digest`,
against every entry without stopping at a match, so timing tells neither a prefix, a length
nor which entry matched. The file is re-read when it changes (checked at most once a
second) and on SIGHUP; a file that cannot be read or parsed keeps the previous tokens.

The interceptor is installed only when a token file is configured: without one, requests
pay nothing for this module.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from serving.metrics import Metrics

log = logging.getLogger("convserve.auth")

GROUPS = ("inference", "metadata", "health", "reflection")
METHOD_GROUPS = {
    **{
        f"/convserve.v1.Classifier/{m}": "inference"
        for m in ("Predict", "PredictStream", "Explain")
    },
    "/convserve.v1.Classifier/GetModelInfo": "metadata",
    "/inference.GRPCInferenceService/ModelInfer": "inference",
    **{
        f"/inference.GRPCInferenceService/{m}": "metadata"
        for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata")
    },
}
SERVICE_GROUPS = {
    "grpc.health.v1.Health": "health",
    "grpc.reflection.v1alpha.ServerReflection": "reflection",
    "grpc.reflection.v1.ServerReflection": "reflection",
}
RECHECK_S = 1.0  # how often (at most) the token file's mtime is looked at
LOG_EVERY_S = 10.0  # at most one denial log line per this many seconds


class TokenFileError(ValueError):
    """A token file that cannot be read or has a malformed line."""


def group_of(method: str) -> str | None:
    """The group of a full method name (`/package.Service/Method`), None when in none."""
    group = METHOD_GROUPS.get(method)
    if group is None:
        group = SERVICE_GROUPS.get(method[1:].partition("/")[0])
    return group


def parse_groups(text: str, where: str) -> frozenset[str]:
    groups = frozenset(g.strip() for g in text.split(",") if g.strip())
    unknown = sorted(groups - set(GROUPS))
    if unknown:
        raise TokenFileError(f"{where}: unknown group(s) {unknown}; groups are {list(GROUPS)}")
    return groups


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, where: str) -> list[tuple[bytes, frozenset[str]]]:
    """Token file text -> (SHA-256 of the token, groups it grants) per entry."""
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise TokenFileError(f"{where}:{n}: expected 'TOKEN [group,group...]'")
        groups = parse_groups(fields[1], f"{where}:{n}") if len(fields) == 2 else None
        entries.append((_digest(fields[0]), groups or frozenset(GROUPS)))
    return entries


class TokenTable:
    """The tokens of a token file, re-read when it changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp = self._stat()
        self._entries = parse_tokens(self._read(), str(self.path))  # raises: refuse to start
        self._next_check = time.monotonic() + RECHECK_S
        if not self._entries:
            log.warning("%s holds no token: only the open groups can be called", self.path)

    def _stat(self) -> tuple[int, int] | None:
        try:
            s = os.stat(self.path)
        except OSError:
            return None
        return s.st_mtime_ns, s.st_ino

    def _read(self) -> str:
        try:
            return self.path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"--auth-token-file {self.path}: cannot be read ({exc})") from None

    def reload(self) -> bool:
        """Re-read the file now; on failure keep the previous tokens and return False."""
        self._stamp = self._stat()
        try:
            self._entries = parse_tokens(self._read(), str(self.path))
        except TokenFileError as exc:
            log.error("token file not reloaded; the previous tokens stay in force: %s", exc)
            return False
        log.info("token file reloaded: %d token(s)", len(self._entries))
        return True

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + RECHECK_S
            if self._stat() != self._stamp:
                self.reload()

    def grants(self, token: str) -> frozenset[str] | None:
        """The groups `token` grants, or None for an unknown token (constant time)."""
        self._maybe_reload()
        presented = _digest(token)
        found = None
        for digest, groups in self._entries:  # all of them: no early exit
            if hmac.compare_digest(presented, digest):
                found = groups
        return found


def _bearer(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _refusal(
    handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the refused one that only aborts."""

    async def abort(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its group is open or its bearer token grants the group."""

    def __init__(self, tokens: TokenTable, open_groups: frozenset[str], metrics: Metrics):
        self.tokens = tokens
        self.open_groups = open_groups
        self._failures = metrics.auth_failures
        self._next_log = 0.0
        self._unlogged = 0

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        group = group_of(details.method)
        if group in self.open_groups:
            return await continuation(details)
        token = _bearer(details.invocation_metadata)
        grants = self.tokens.grants(token) if token else None
        if grants is not None and group in grants:
            return await continuation(details)
        # The refusal must be a handler of the real method's kind (a streaming one must not
        # wait for a first message the client may never send).
        handler = await continuation(details)
        if grants is None:
            code, why = grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required"
        elif handler is None:
            return None  # a known caller, a method that does not exist: UNIMPLEMENTED
        else:
            code, why = grpc.StatusCode.PERMISSION_DENIED, "this token does not grant this method"
        self._refused(details.method, group, code)
        return _refusal(handler, code, why)

    def _refused(self, method: str, group: str | None, code: grpc.StatusCode) -> None:
        self._failures.labels(group or "none", code.name).inc()
        # One line per LOG_EVERY_S at most, however fast the refusals come.
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.warning(
                "refused %s with %s (%d refusal(s) since the last such line; at most one "
                "line per %.0fs)",
                method[:200],
                code.name,
                self._unlogged,
                LOG_EVERY_S,
            )
            self._next_log = now + LOG_EVERY_S
            self._unlogged = 0
