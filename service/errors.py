"""The errors the service answers with, one class per row of the error table in docs/service.md.

Each error knows its HTTP status, its machine-readable ``code`` (the body is
``{"error": {"code": ..., "message": ...}}``) and, for rejected requests, the ``reason`` label of
``robustnorm_rejected_total``. They are raised anywhere below the HTTP layer (decoding, batcher, engine) and
turned into responses in one place, :mod:`service.app`.
"""

from __future__ import annotations

import math
from typing import ClassVar


class ServiceError(Exception):
    """An error with an HTTP status and a message that says what the client can do about it."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    reason: ClassVar[str | None] = None  # label of robustnorm_rejected_total, when this is a rejection

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        return {}


class BadImage(ServiceError):
    """400: the body or an image in it cannot be decoded."""

    status_code = 400
    code = reason = "bad_image"


class Unauthorized(ServiceError):
    """401: API keys are configured and the request carries none of them."""

    status_code = 401
    code = reason = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    """403: the key is valid but its role may not use this route (admin routes need an admin key)."""

    status_code = 403
    code = "forbidden"
    reason = "unauthorized"


class NotFound(ServiceError):
    """404: the route is switched off (admin routes exist only when an admin key is configured)."""

    status_code = 404
    code = "not_found"


class BodyTimeout(ServiceError):
    """408: the request body did not arrive within ``body_timeout`` of the request's first byte."""

    status_code = 408
    code = reason = "body_timeout"


class TooLarge(ServiceError):
    """413: an image or the body has too many bytes, or an image has too many pixels."""

    status_code = 413
    code = reason = "too_large"


class TooManyImages(ServiceError):
    """413: more images in one request than ``max_images_per_request``."""

    status_code = 413
    code = reason = "too_many_images"


class UnsupportedType(ServiceError):
    """415: a content type or image format the service does not read."""

    status_code = 415
    code = reason = "unsupported_type"


class InvalidRequest(ServiceError):
    """422: a parameter or a JSON field is invalid."""

    status_code = 422
    code = reason = "invalid"


class QueueFull(ServiceError):
    """429: the queue holds ``queue_limit`` images; retry after the estimated time to drain it."""

    status_code = 429
    code = reason = "queue_full"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        # Retry-After takes whole seconds (RFC 9110); never 0, or clients retry in a tight loop.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class TenantQueueFull(QueueFull):
    """429: the tenant holds its share of the queue (``tenant_queue_share``) while other tenants are active."""

    code = reason = "tenant_share"


class TenantRateExceeded(QueueFull):
    """429: the tenant was admitted ``tenant_rate`` requests a second already; Retry-After says when the next
    fits (the code HAProxy's quota in the shipped deployment answers with too)."""

    code = reason = "tenant_rate"


class Overloaded(QueueFull):
    """429: the queue's expected wait ends after the request's deadline; it is refused rather than queued to be
    late."""

    code = reason = "overloaded"


class UploadsFull(ServiceError):
    """503: ``max_uploads`` request bodies are arriving already; retry in a second (a small body sent in one
    piece is never refused for this)."""

    status_code = 503
    code = reason = "uploads_full"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ClientGone(ServiceError):
    """499 (nginx's "client closed request"): the client hung up before its answer was ready. Nobody reads the
    answer; the status is for the metrics and the log."""

    status_code = 499
    code = "client_closed_request"


class NotReady(ServiceError):
    """503: the model is still loading or warming up."""

    status_code = 503
    code = "not_ready"


class Draining(ServiceError):
    """503: the service is shutting down and takes no new work."""

    status_code = 503
    code = "draining"


class Unavailable(ServiceError):
    """503: the batching loop or the engine stopped; the service cannot answer until it is restarted."""

    status_code = 503
    code = "unavailable"


class DeadlineExceeded(ServiceError):
    """504: the request's deadline passed (or too little time was left) before its images ran, and they were
    dropped; or its answer was ready only after the deadline. ``stage`` says where late work was dropped
    (``queue``, ``answer``), when it was."""

    status_code = 504
    code = reason = "deadline"

    def __init__(self, message: str, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class InferenceFailed(ServiceError):
    """500: the model raised on a batch. A bug, never the client's input: logged with its traceback."""

    status_code = 500
    code = "inference_failed"
