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

Which method belongs to which group, and the gRPC interceptor that enforces it, are the
gRPC front end's (serving.grpc.auth); this module knows tokens and groups only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("convserve.auth")

GROUPS = ("inference", "metadata", "health", "reflection")
RECHECK_S = 1.0  # how often (at most) the token file's mtime is looked at


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
