"""The FastAPI application: lifespan (load, warm up, drain), error handling and request metrics.

``create_app`` does all the work when called, none at import: tests build apps with their own settings and
a fresh ``CollectorRegistry``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import robustnorm
from robustnorm.runtime import retain_freed_memory

from .errors import ServiceError
from .metrics import Metrics
from .predictor import EngineFactory, Predictor
from .routes import router
from .schemas import ErrorDetail, ErrorResponse
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
    body = ErrorResponse(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


class RequestMetricsMiddleware:
    """Counts and times every HTTP request by route template (never the raw path) and status code."""

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
            self.metrics.observe_request(template, status_code, time.perf_counter() - started)


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        if error.reason is not None:
            metrics.reject(error.reason)
        # Rejections are counted, not logged one by one; failures are logged where they happen.
        logger.debug("%s %s -> %d %s", request.method, request.url.path, error.status_code, error.message)
        return _error_response(error.status_code, error.code, error.message, error.headers())

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        metrics.reject("invalid")
        problems = "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors())
        return _error_response(422, "invalid", f"invalid parameters: {problems}")

    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = HTTPStatus(error.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return _error_response(error.status_code, code, str(error.detail), dict(error.headers or {}))

    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return _error_response(500, "internal", "internal error; it is in the service log")

    app.add_exception_handler(ServiceError, service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected_error)


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
                         lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    _install_error_handlers(app, metrics)
    app.include_router(router)
    return app
