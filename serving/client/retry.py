"""One retry policy for both clients: which statuses are tried again, how long to wait
between tries, and one deadline across them all; and the error a call ends in."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class PredictionError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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


class Attempts:
    """The tries of one unary call under `retry`, all inside `timeout` seconds from now
    (None: no deadline). The clients' loops differ only in how they wait."""

    def __init__(self, retry: Retry, timeout: float | None):
        self.retry = retry
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.attempt = 0

    def timeout(self) -> float | None:
        """The next try's timeout: what is left of the deadline."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PredictionError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
        return left

    def backoff(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before trying again after `exc`; PredictionError when the status
        is not worth another try, the tries are used up, or the wait would pass the deadline."""
        wait = -1.0
        if exc.code() in RETRYABLE and self.attempt + 1 < self.retry.attempts:
            wait = self.retry.delay(self.attempt)
            if self.deadline is not None and time.monotonic() + wait >= self.deadline:
                wait = -1.0
        if wait < 0:
            raise PredictionError(exc.code(), exc.details()) from None
        self.attempt += 1
        return wait
