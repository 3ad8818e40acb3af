"""One retry policy for both clients: which statuses are tried again, how long to wait
between tries, and one deadline across them all; adaptive throttling and a retry budget, so
that clients facing an overloaded server send it less, not more; and the error a call ends
in."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
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
    # Adaptive throttling (Google SRE book, "Handling Overload"): once the server refuses
    # calls, a call is refused here, unsent, with probability
    # (requests - throttle_k * accepted) / (requests + 1) over the last throttle_window_s.
    # None: off.
    throttle_k: float | None = 2.0
    throttle_window_s: float = 120.0
    # Retry budget: retries may add at most this share to the calls sent (as gRPC's retry
    # throttling: a token bucket of retry_tokens). None: unlimited (e.g. to wait for a
    # server that is still starting).
    retry_budget: float | None = 0.1
    retry_tokens: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt))


# Answers that say the server did not take the call on: counted against it by the throttle.
REFUSED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


class Throttle:
    """What one client has seen of its server: requests and accepted requests over a sliding
    window (for adaptive throttling), and the retry budget's tokens. Shared by every call of
    the client, from any thread."""

    BUCKETS = 12
    MIN_REQUESTS = 10

    def __init__(
        self,
        retry: Retry,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ):
        self.retry = retry
        self.clock = clock
        self.rand = rand
        self.span = retry.throttle_window_s / self.BUCKETS
        self.buckets: list[list[float]] = []  # [start, requests, accepts]
        self.tokens = retry.retry_tokens
        self.lock = threading.Lock()

    def _bucket(self, now: float) -> list[float]:
        horizon = now - self.retry.throttle_window_s
        while self.buckets and self.buckets[0][0] <= horizon:
            self.buckets.pop(0)
        if not self.buckets or now - self.buckets[-1][0] >= self.span:
            self.buckets.append([now, 0.0, 0.0])
        return self.buckets[-1]

    def reject_probability(self) -> float:
        k = self.retry.throttle_k
        if k is None:
            return 0.0
        with self.lock:
            self._bucket(self.clock())
            requests = sum(b[1] for b in self.buckets)
            accepts = sum(b[2] for b in self.buckets)
        if requests < self.MIN_REQUESTS:  # too few to judge the server by
            return 0.0
        return max(0.0, (requests - k * accepts) / (requests + 1))

    def admit(self) -> bool:
        """Whether to send a call now. A call refused here counts as a request at once; a
        sent one when its answer comes (calls in flight are neither accepted nor refused)."""
        send = self.rand() >= self.reject_probability()
        with self.lock:
            if not send:
                self._bucket(self.clock())[1] += 1
            elif self.retry.retry_budget is not None:
                earned = round(self.tokens + self.retry.retry_budget, 9)  # 10 x 0.1 is 1
                self.tokens = min(self.retry.retry_tokens, earned)
        return send

    def answered(self, code: grpc.StatusCode) -> None:
        with self.lock:
            bucket = self._bucket(self.clock())
            bucket[1] += 1
            if code not in REFUSED:
                bucket[2] += 1

    def spend_retry(self) -> bool:
        """Take a token for one retry; False when the budget is spent."""
        if self.retry.retry_budget is None:
            return True
        with self.lock:
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


class Attempts:
    """The tries of one unary call under `retry`, all inside `timeout` seconds from now
    (None: no deadline). The clients' loops differ only in how they wait."""

    def __init__(self, retry: Retry, timeout: float | None, throttle: Throttle):
        self.retry = retry
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.attempt = 0
        self.throttle = throttle  # the client's: a fresh one per call would never throttle

    def timeout(self) -> float | None:
        """The next try's timeout: what is left of the deadline. PredictionError when none
        is left, or when the throttle keeps this try from being sent (RESOURCE_EXHAUSTED)."""
        left = None
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise PredictionError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
        if self.attempt == 0 and not self.throttle.admit():
            raise PredictionError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "not sent: the server has been refusing most calls (client-side throttling)",
            )
        return left

    def succeeded(self) -> None:
        self.throttle.answered(grpc.StatusCode.OK)

    def backoff(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before trying again after `exc`; PredictionError when the status
        is not worth another try, the tries are used up, the retry budget is spent, or the
        wait would pass the deadline."""
        self.throttle.answered(exc.code())
        wait = -1.0
        if exc.code() in RETRYABLE and self.attempt + 1 < self.retry.attempts:
            wait = self.retry.delay(self.attempt)
            late = self.deadline is not None and time.monotonic() + wait >= self.deadline
            if late or not self.throttle.spend_retry():
                wait = -1.0
        if wait < 0:
            raise PredictionError(exc.code(), exc.details()) from None
        self.attempt += 1
        return wait
