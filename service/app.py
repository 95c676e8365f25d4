"""The FastAPI application: lifespan (load, warm up, drain), error handling, request metrics and the guard
on what a client can hold with a request (body time, size and number; connections closed when needed).

``create_app`` does all the work when called, none at import: tests build apps with their own settings and
a fresh ``CollectorRegistry``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import robustnorm
from robustnorm.runtime import retain_freed_memory

from .cli import REQUEST_STARTED
from .deadlines import within
from .door import Door, DoorMiddleware
from .errors import BodyTimeout, ClientGone, ServiceError, TooLarge, UploadsFull
from .metrics import CLIENT_GONE, Metrics
from .predictor import EngineFactory, Predictor
from .routes import router, serve_predict
from .settings import Settings

logger = logging.getLogger(__name__)

DESCRIPTION = """Image classification whose normalization layers adapt to the traffic they see.

Requests are collected into micro-batches; each batch is normalised with its own statistics when it is
large enough, and with robust or population statistics when it is small. Every answer says which batch it
ran in and which statistics ran; drift from the training population is exported as Prometheus metrics.
"""


def default_registry() -> CollectorRegistry:
    """A fresh registry with the process, platform and GC collectors the default one would have."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None
                    ) -> JSONResponse:
    # ErrorResponse's shape (schemas.ErrorResponse, which the OpenAPI schema documents), built without pydantic:
    # under overload most answers are errors, and validating two models took a tenth of a refusal's cost
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code, headers=headers)


# How much of a refused request's unread body is still read (see RequestGuardMiddleware): while it pauses no
# longer than LINGER_IDLE seconds (a body already in flight arrives in milliseconds; a trickled one is not waited
# for), and at most LINGER_BYTES of it (a proxy's buffer, a few images; a larger remainder is not worth reading).
LINGER_IDLE = 0.25
LINGER_BYTES = 256 * 1024

# Scope key set when the client hung up before its answer was sent: the request is counted as 499.
CLIENT_LEFT = "robustnorm.client_left"


class RequestGuardMiddleware:
    """Bounds what one request can hold, on every route.

    - Its body must arrive within ``body_timeout`` of the request's first byte (408 after) and hold at most
      ``max_request_bytes`` (413 beyond).
    - At most ``max_uploads`` bodies arrive at once: a body that does not come in one piece takes a place until
      it is complete, and gets 503 when none is free. Slow uploads hold little memory and never for long.
    - A response sent before the body was read waits while the rest of the body keeps arriving (within the
      bounds above, no pause over ``LINGER_IDLE`` and at most ``LINGER_BYTES`` more; not when refused for
      ``max_uploads``); if the body is still incomplete, the connection closes
      after it, as it does after every response while draining: kept-alive clients of a draining service
      reconnect elsewhere, and no connection closes on bytes still in flight, which would reset it and could
      destroy the answer before it is read.
    - A client that hangs up before its answer is marked in the scope (``CLIENT_LEFT``).
    - A request line and headers over ``max_header_bytes`` get 431 (uvicorn refuses them only while they are
      still arriving).
    """

    def __init__(self, app: ASGIApp, body_timeout: float, max_body_bytes: int, max_uploads: int,
                 max_header_bytes: int, draining: Callable[[], bool]) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.max_body_bytes = max_body_bytes
        self.max_uploads = max_uploads
        self.max_header_bytes = max_header_bytes
        self.draining = draining
        self.uploads = 0  # bodies arriving now, in pieces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(name) + len(value) + 4 for name, value in scope["headers"])
        if head_bytes > self.max_header_bytes:
            message = f"the request line and headers hold {head_bytes} bytes; the limit is {self.max_header_bytes}"
            await _error_response(431, "headers_too_large", message, {"Connection": "close"})(scope, receive, send)
            return
        body_until = scope.setdefault(REQUEST_STARTED, time.monotonic()) + self.body_timeout
        headers = dict(scope["headers"])
        body_done = b"transfer-encoding" not in headers and headers.get(b"content-length", b"0").strip() in (b"0", b"")
        holds_upload = answered = shed = False
        received = 0

        def free_upload_place() -> None:
            nonlocal holds_upload
            if holds_upload:
                self.uploads -= 1
                holds_upload = False

        async def guarded_receive() -> Message:
            nonlocal body_done, holds_upload, received, shed
            if body_done:
                message = await receive()  # nothing but http.disconnect comes after the body
            else:
                try:
                    message = await within(receive(), body_until - time.monotonic())
                except asyncio.TimeoutError:
                    free_upload_place()
                    raise BodyTimeout(f"the request body did not arrive within {self.body_timeout:g} s of the "
                                      "request's first byte; send it faster or in a smaller request") from None
            if message["type"] == "http.disconnect":
                free_upload_place()
                if not answered:
                    scope[CLIENT_LEFT] = True
                return message
            if message["type"] == "http.request" and not body_done:
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    free_upload_place()
                    raise TooLarge(f"the request body exceeds the limit of {self.max_body_bytes} bytes")
                if not message.get("more_body", False):
                    body_done = True
                    free_upload_place()
                elif not holds_upload:
                    if self.uploads >= self.max_uploads:
                        shed = True  # refused for the bodies arriving: its own is not read
                        raise UploadsFull(f"{self.uploads} request bodies are arriving already, the most this "
                                          "service takes at once; retry in a second")
                    self.uploads += 1
                    holds_upload = True
            return message

        async def read_rest_of_body() -> None:
            """Reads what is left of a body the app did not read, while it keeps coming (a pause of
            ``LINGER_IDLE`` ends it), up to ``LINGER_BYTES`` more and within the body's bounds: the connection
            then closes after the answer with nothing unread, where unread bytes would make the kernel reset it
            and could destroy the answer before the client (or a proxy still sending) has read it. A slow or
            large body is not waited for, nor one refused because too many bodies are arriving."""
            nonlocal body_done, received
            until_bytes = min(self.max_body_bytes, received + LINGER_BYTES)
            while not body_done and not shed and received <= until_bytes:
                try:
                    message = await within(receive(), min(LINGER_IDLE, body_until - time.monotonic()))
                except asyncio.TimeoutError:
                    return
                if message["type"] != "http.request":
                    return
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                if not body_done:
                    await read_rest_of_body()
                if not body_done or self.draining():
                    kept = [(name, value) for name, value in message.get("headers", [])
                            if name.lower() != b"connection"]
                    message = {**message, "headers": [*kept, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            free_upload_place()


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template (never the raw path) and status code; a request
    whose client hung up before its answer counts as 499."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500  # what the client gets if the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            code = CLIENT_GONE if scope.get(CLIENT_LEFT) else status_code
            self.metrics.observe_request(template, code, time.perf_counter() - started)


def error_response(request: Request, error: Exception, metrics: Metrics) -> JSONResponse:
    """The answer to a request that failed with ``error``: the service's error body, and the rejection counted
    (``robustnorm_rejected_total``) where it is one. Used by FastAPI's exception handlers and by the door's
    ``POST /predict``."""
    if isinstance(error, ServiceError):
        if error.reason is not None:
            metrics.reject(error.reason)
        # Rejections are counted, not logged one by one; failures are logged where they happen.
        logger.debug("%s %s -> %d %s", request.method, request.url.path, error.status_code, error.message)
        return _error_response(error.status_code, error.code, error.message, error.headers())
    if isinstance(error, RequestValidationError):
        metrics.reject("invalid")
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors())
        return _error_response(422, "invalid", f"invalid parameters: {problems}")
    if isinstance(error, StarletteHTTPException):
        code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return _error_response(error.status_code, code, str(error.detail), dict(error.headers or {}))
    if isinstance(error, ClientDisconnect):
        # Not a failure of the service: nobody reads this answer; it is counted as 499 and logged at debug level.
        logger.debug("%s %s: the client hung up while sending its body", request.method, request.url.path)
        gone = ClientGone("the client hung up while sending its body")
        return _error_response(gone.status_code, gone.code, gone.message)
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return _error_response(500, "internal", "internal error; it is in the service log")


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        return error_response(request, error, metrics)

    for kind in (ServiceError, RequestValidationError, StarletteHTTPException, ClientDisconnect, Exception):
        app.add_exception_handler(kind, handler)


# FastAPI's own OpenTelemetry hooks (FastAPI 0.165 and later) asked, on every request, whether a provider had been
# configured since; the service exports its metrics to Prometheus itself, so they are off where FastAPI has them.
NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None,
               engine_factory: EngineFactory | None = None) -> FastAPI:
    """The service as an ASGI app. The model is loaded when the app starts (its lifespan), not here."""
    settings = settings if settings is not None else Settings()
    metrics = Metrics(registry if registry is not None else default_registry(),
                      max_batch_size=settings.max_batch_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        retain_freed_memory()  # no page faults on fresh activation buffers (robustnorm/runtime.py)
        predictor = Predictor(settings, metrics, engine_factory)
        await predictor.start()  # a model that cannot be loaded stops the start-up here
        app.state.predictor = predictor
        try:
            yield
        finally:
            logger.info("draining: finishing queued requests")
            await predictor.stop()

    # /docs and /redoc load their scripts and styles from the package (under /static-offline-docs), not a CDN,
    # so the API docs work where the service has no internet access.
    app = FastAPIOffline(title="robustnorm", version=robustnorm.__version__, description=DESCRIPTION,
                         lifespan=lifespan, **NO_TELEMETRY)
    app.state.settings = settings
    app.state.metrics = metrics

    def draining() -> bool:
        predictor = getattr(app.state, "predictor", None)
        return predictor is not None and predictor.draining

    # The last added runs first: the metrics see every answer the guard gives, and the door reads bodies through
    # the guard.
    app.state.door = door = Door(settings, metrics, lambda: getattr(app.state, "predictor", None))
    app.add_middleware(DoorMiddleware, door=door,
                       serve=functools.partial(serve_predict, settings=settings,
                                               on_error=functools.partial(error_response, metrics=metrics)),
                       respond=lambda error: _error_response(error.status_code, error.code, error.message,
                                                             error.headers()))
    app.add_middleware(RequestGuardMiddleware, body_timeout=settings.body_timeout,
                       max_body_bytes=settings.max_request_bytes, max_uploads=settings.max_uploads,
                       max_header_bytes=settings.max_header_bytes, draining=draining)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    _install_error_handlers(app, metrics)
    app.include_router(router)
    return app
