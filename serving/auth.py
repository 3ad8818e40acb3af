"""Token auth: `authorization: Bearer <token>` checked against a token file, per endpoint group.

The token file holds one token per line, optionally followed by the groups it grants:

    # comment
    s3cr3t-for-the-web-app   inference,metadata
    s3cr3t-for-ops                               (no groups: every group)

Every method of a front end belongs to one group; a method in no group is refused to every
token (fail closed). Groups listed in `--open-groups` need no token.
A missing or unknown token is UNAUTHENTICATED; a known token outside its groups is
PERMISSION_DENIED. Tokens are compared as SHA-256 digests with `hmac.compare_digest`,
against every entry without stopping at a match, so timing tells neither a prefix, a length
nor which entry matched. The file is re-read when it changes (checked at most once a
second) and on SIGHUP; a file that cannot be read or parsed keeps the previous tokens.

Which method belongs to which group, and how a refusal is sent, are each front end's
(serving.grpc.auth, serving.http.server); the decision (`Gate`) is made here, once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("convserve.auth")

GROUPS = ("inference", "metadata", "health", "reflection", "admin")
RECHECK_S = 1.0  # how often (at most) the token file's mtime is looked at
LOG_EVERY_S = 10.0  # at most one refusal log line per this many seconds
UNAUTHENTICATED = "UNAUTHENTICATED"  # no token, or an unknown one
PERMISSION_DENIED = "PERMISSION_DENIED"  # a known token that does not grant the group


class TokenFileError(ValueError):
    """A token file that cannot be read or has a malformed line."""


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


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (None when it is not one)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Gate:
    """Which calls pass: those of an open group, and those whose bearer token grants the
    group. Refusals are counted by group and code, and logged at most once per LOG_EVERY_S
    however fast they come."""

    def __init__(self, tokens: TokenTable, open_groups: frozenset[str], failures: Any):
        self.tokens = tokens
        self.open_groups = open_groups
        self._failures = failures  # a Counter labelled (group, code)
        self._next_log = 0.0
        self._unlogged = 0

    def refusal(self, group: str | None, token: str | None) -> str | None:
        """None when the call may pass; else UNAUTHENTICATED or PERMISSION_DENIED."""
        if group in self.open_groups:
            return None
        grants = self.tokens.grants(token) if token else None
        if grants is None:
            return UNAUTHENTICATED
        return None if group in grants else PERMISSION_DENIED

    def refused(self, what: str, group: str | None, code: str) -> None:
        self._failures.labels(group or "none", code).inc()
        self._unlogged += 1
        now = time.monotonic()
        if now >= self._next_log:
            log.warning(
                "refused %s with %s (%d refusal(s) since the last such line; at most one "
                "line per %.0fs)",
                what[:200],
                code,
                self._unlogged,
                LOG_EVERY_S,
            )
            self._next_log = now + LOG_EVERY_S
            self._unlogged = 0
