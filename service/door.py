"""Admission at the door: ``POST /predict`` requests that cannot be answered in time are refused before routing.

Under overload, refusing must cost far less than serving, or refusals take the time that answers need and
goodput collapses. So the same admission the batcher applies (:meth:`service.batcher.MicroBatcher.admit`: the
request's deadline, its tenant's share of the queue, the queue's expected wait) runs here first, in plain ASGI,
for a request of one image with the longest deadline the service allows: a request refused here would be
refused later too. Its body is read (so that the connection stays open for the client's next request) and it
is answered 429 with ``Retry-After``, or 504 when its deadline has passed already (time queued in a trusted
proxy in front included, see :mod:`service.deadlines`). What it admits it answers itself, with the route's own
work and without FastAPI's routing (:func:`service.routes.serve_predict`), which checks again with the request's
real image count and deadline. A request it cannot identify (a bad key) or that comes before the model is ready
goes on to the FastAPI route, whose dependencies say why it cannot be answered.

The decision itself is :class:`Door`'s. The HTTP protocol asks it too (:meth:`Door.refuse_early`, see
``service.cli.GuardedProtocol``), as soon as a request's head is parsed, for the requests it can answer on its
own: a small body of known length, kept alive, no ``Expect: 100-continue``. Those it refuses are answered there
and then, and their body is dropped as it arrives, without an ASGI task or any middleware: under overload most
requests are refused, and every one refused at the door's ASGI cost was taken from the answers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .cli import REQUEST_STARTED
from .deadlines import REQUEST_START_HEADER, accepted_at
from .deps import identify
from .errors import Overloaded, ServiceError
from .metrics import Metrics
from .predictor import Predictor
from .settings import Settings

PREDICT = SimpleNamespace(path="/predict")  # the route template requests refused here are counted under
SMALL_BODY = 64 * 1024  # bytes: a body this small arrives with its request's head
ARRIVAL = "robustnorm.arrival"  # scope key: the request's Arrival, for the batcher (service.batcher.Arrival)
ADMITTED = "robustnorm.admitted"  # scope key, set when the request was let in as its head was parsed: its tenant


class Door:
    """Whether a ``POST /predict`` request is refused before anything is done for it, and why."""

    def __init__(self, settings: Settings, metrics: Metrics, predictor: Callable[[], Predictor | None]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.predictor = predictor

    def ready(self) -> Predictor | None:
        """The predictor, when it takes requests (not before the model is ready)."""
        predictor = self.predictor()
        return predictor if predictor is not None and predictor.ready else None

    def refusal(self, predictor: Predictor, scope: Scope, tenant: str | None, request_start: str | None
                ) -> ServiceError | None:
        """The error that refuses the request of ``scope`` and ``tenant`` now, or None to let it in;
        ``request_start``: its ``X-Request-Start`` header, if any."""
        first_byte = scope.get(REQUEST_STARTED) or time.monotonic()
        started = accepted_at(first_byte, request_start, trusted=self.settings.trust_request_start)
        deadline = started + self.settings.request_deadline
        try:
            predictor.admit(1, policy=predictor.engine.policy, tenant=tenant, deadline=deadline)
        except ServiceError as error:
            return error
        waited = time.monotonic() - started
        if waited > self.settings.request_deadline / 2:
            # The service reads requests first come, first served: one that waited this long to be read says the
            # requests behind it wait as long. Refusing those that have used half their time drains that backlog
            # at the cost of a refusal each; serving them would answer them late, or leave no time for the rest.
            return Overloaded(f"the service is behind: this request waited {waited:.3f} s before it was read, more "
                              "than half its deadline; retry after the time in Retry-After", retry_after=waited)
        return None

    def tenant(self, scope: Scope) -> str | None:
        """The tenant of a request that may call /predict (a ServiceError for one that may not)."""
        settings = self.settings
        if settings.batch_key == "none" and not (settings.api_keys or settings.admin_keys or settings.metrics_keys):
            return None  # no keys to check, no tenants
        return identify(Request(scope), settings)

    def refuse_early(self, scope: Scope) -> ServiceError | None:
        """For the HTTP protocol, once a request's head is parsed: the error to answer it with at once (counted
        as the door's refusals are), or None to hand it to the app. Only for a ``POST /predict`` whose body is
        small and of known length (a body that may be large or slow goes through the app's guard); the protocol
        checks the rest (the connection kept alive, no ``Expect: 100-continue``, the head within its limit)."""
        if scope["method"] != "POST" or scope["path"] != "/predict":
            return None
        predictor = self.ready()
        if predictor is None:
            return None  # not ready, or draining: the app says why (and closes a draining connection after)
        length, request_start = b"", None
        for name, value in scope["headers"]:  # (names are lower case in ASGI)
            if name == b"content-length":
                length = value.strip()
            elif name == b"transfer-encoding":
                return None
            elif name == b"x-request-start":
                request_start = value.decode("latin-1")
        if not length.isdigit() or int(length) > SMALL_BODY:
            return None
        try:
            tenant = self.tenant(scope)
        except ServiceError:
            return None  # a bad key or tenant: the route answers it
        error = self.refusal(predictor, scope, tenant, request_start)
        if error is None:
            # Let in: the middleware does not ask again. Asked again when its task starts, a few milliseconds on,
            # it would often say no (under overload a request's wait is near the limit), and refusing it there
            # costs an ASGI task and the middlewares.
            scope[ADMITTED] = tenant
            return None
        if error.reason is not None:
            self.metrics.reject(error.reason)
        self.metrics.observe_request(PREDICT.path, error.status_code,
                                     time.monotonic() - (scope.get(REQUEST_STARTED) or time.monotonic()))
        return error


class DoorMiddleware:
    """Refuses, cheaply, ``POST /predict`` requests that the batcher would refuse, and counts those it lets in as
    being answered (see the module docstring)."""

    def __init__(self, app: ASGIApp, door: Door, respond: Callable[[ServiceError], ASGIApp],
                 serve: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.door = door
        self.metrics = door.metrics
        self.respond = respond
        self.serve = serve  # POST /predict without routing (service.routes.serve_predict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/predict":
            predictor = self.door.ready()
            if predictor is not None and ADMITTED in scope:
                await self._admitted(predictor, scope[ADMITTED], scope, receive, send)
                return
            if predictor is not None:
                try:
                    tenant = self.door.tenant(scope)
                except ServiceError:
                    pass  # a bad key or tenant: the route answers it
                else:
                    refusal = self.door.refusal(predictor, scope, tenant,
                                                Headers(scope=scope).get(REQUEST_START_HEADER))
                    if refusal is not None:
                        await self._refuse(refusal, scope, receive, send)
                        return
                    await self._admitted(predictor, tenant, scope, receive, send)
                    return
        await self.app(scope, receive, send)  # the route says why it cannot answer

    async def _admitted(self, predictor: Predictor, tenant: str | None, scope: Scope, receive: Receive,
                        send: Send) -> None:
        """Run an admitted request, one of ``max_active_requests`` until it is answered: from now when its body
        is small (it comes with the head), else from when its body has arrived (one still arriving is bounded by
        ``max_uploads``, not here)."""
        with contextlib.ExitStack() as working:
            counted = False
            length = dict(scope["headers"]).get(b"content-length", b"").strip()
            if length.isdigit() and int(length) <= SMALL_BODY:
                scope[ARRIVAL] = working.enter_context(predictor.working(tenant))
                counted = True

            async def counting_receive() -> Message:
                nonlocal counted
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body", False) and not counted:
                    scope[ARRIVAL] = working.enter_context(predictor.working(tenant))
                    counted = True
                return message

            await self.serve(scope, counting_receive, send, predictor=predictor, tenant=tenant)

    async def _refuse(self, error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
        try:  # read the body, so that the connection can carry the client's next request
            while True:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    break
        except ServiceError as body_error:  # the guard's limits on the body (408, 413, 503)
            error = body_error
        if error.reason is not None:
            self.metrics.reject(error.reason)
        scope["route"] = PREDICT
        await self.respond(error)(scope, receive, send)
