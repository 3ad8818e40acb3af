"""Errors raised by the serving core. Each maps to one gRPC status code, in one table
(`serving.grpc.status.STATUS_OF`); the core never sees gRPC types."""

from __future__ import annotations


class ServingError(Exception):
    """Base class: the message is what the client reads."""

    reason = "internal"


class InvalidInput(ServingError):
    """The request itself is wrong (bad image, shape, dtype, option...)."""

    reason = "invalid_argument"


class ModelNotFound(ServingError):
    reason = "not_found"


class NotReady(ServingError):
    """No model is loaded yet (start-up, or nothing valid in the repository)."""

    reason = "not_ready"


class QueueFull(ServingError):
    """Load shedding: the model's queue is at --max-queue-size."""

    reason = "queue_full"


class Overloaded(QueueFull):
    """Load shedding at admission: the work already queued would outlast the call's deadline."""

    reason = "overloaded"


class FailedPrecondition(ServingError):
    """The call is not allowed in the server's present configuration (e.g. loading a model
    without explicit model control); the message says what would allow it."""

    reason = "failed_precondition"


class MessageTooLarge(ServingError):
    reason = "message_too_large"


class DeadlineExceeded(ServingError):
    """The request's deadline passed before it could be computed."""

    reason = "deadline_exceeded"


class Draining(ServingError):
    """The server is shutting down and admits no new work."""

    reason = "draining"


class InferenceFailed(ServingError):
    """ONNX Runtime failed on a batch; only that batch's requests see this."""

    reason = "inference_failed"


class ModelLoadError(ServingError):
    """A model version that cannot be served (refused at load; the old version stays).

    `refusal` is a bounded category (serving.model.REFUSALS) for metrics and alerts;
    the message says exactly what is wrong and where.
    """

    reason = "load_failed"

    def __init__(self, message: str, refusal: str = "other"):
        super().__init__(message)
        self.refusal = refusal


class DeviceUnavailable(ServingError):
    """An explicitly requested execution provider cannot run here."""

    reason = "device_unavailable"
