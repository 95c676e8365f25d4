"""``robustnorm-serve``: run the inference service with uvicorn.

With no arguments it serves the bundled default model on 127.0.0.1:8000, on the GPU when there is one. Every
setting of :class:`service.settings.Settings` is an option (``--max-batch-size``), also settable as an
environment variable (``ROBUSTNORM_MAX_BATCH_SIZE``) or in a config file (``--config-file``); options win over
the environment, which wins over the file. API keys are read from the environment or the config file only,
so that they never show in a process list. ``--help`` answers without importing torch: the model, the engine
and the app are imported only once the settings are valid.

Two pieces of uvicorn are adapted here (:func:`build_server`): its httptools protocol, so that a client has
``header_timeout`` seconds to send a request's headers (uvicorn bounds only idle kept-alive connections), a
head has a size limit while it arrives, and the requests the door refuses are answered before any ASGI task
is made for them; and its server, so that SIGTERM drains the service with the listener still open (uvicorn
closes it at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import socket
import sys
import time
import typing
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from .settings import ENV_PREFIX, Settings

if typing.TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

_NOT_FLAGS = frozenset({"api_keys", "admin_keys", "metrics_keys"})  # secrets stay out of argv

# Scope key: the time.monotonic() at which a request's first byte arrived. The app counts the body timeout and
# the request deadline from it.
REQUEST_STARTED = "robustnorm.request_started"
EXIT_MARGIN = 1.0  # seconds of the drain timeout kept for the app's own shutdown and the process exit


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, *,
                    close: bool = True, default_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A complete HTTP response with the service's error body (``service.schemas.ErrorResponse``), ``headers``
    and ``default_headers`` (uvicorn's date and server); ``close``: the connection closes after it."""
    body = b'{"error":{"code":%s,"message":%s}}' % (json.dumps(code).encode(),
                                                     json.dumps(message, ensure_ascii=False).encode())
    lines = [STATUS_LINE[status], *(name + b": " + value + b"\r\n" for name, value in default_headers),
             b"content-length: %d\r\ncontent-type: application/json\r\n" % len(body),
             *(f"{name.lower()}: {value}\r\n".encode("latin-1") for name, value in (headers or {}).items()),
             b"connection: close\r\n" if close else b"", b"\r\n", body]
    return b"".join(lines)


class EarlyRefusal(typing.Protocol):
    """What the protocol needs of an error it answers itself (``service.errors.ServiceError``)."""

    status_code: int
    code: str
    message: str

    def headers(self) -> dict[str, str]: ...


# A connection closed while its request's body is still arriving first shuts its sending side and reads (and
# drops) what the client still sends, for at most this long and this many bytes (see _LingeringTransport).
CLOSE_LINGER_SECONDS = 1.0
CLOSE_LINGER_BYTES = 8 << 20


class _LingeringTransport:
    """A transport whose ``close()`` lets a client that is still sending a body read the answer first.

    Closing a socket with unread bytes in it makes the kernel reset the connection, and a reset can destroy an
    answer the client has not read yet: a client refused while uploading (``uploads_full``, a body too large)
    would see its connection reset instead of the 503 or 413. So when the current request's body has not all
    arrived, ``close()`` ends the sending side (the client reads the answer, then the end), keeps reading and
    dropping what the client sends, and closes for good once the client closes, after ``CLOSE_LINGER_SECONDS``,
    or past ``CLOSE_LINGER_BYTES``. Everything else goes to the wrapped transport."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self.lingering = False
        self._dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.lingering or self._transport.is_closing():
            return
        cycle = self._protocol.cycle
        if cycle is None or not cycle.more_body or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()
        self._transport.resume_reading()
        self._timer = self._protocol.loop.call_later(CLOSE_LINGER_SECONDS, self.end)

    def drop(self, data: bytes) -> None:
        """Bytes that arrived while lingering."""
        self._dropped += len(data)
        if self._dropped > CLOSE_LINGER_BYTES:
            self.end()

    def end(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on each request's head (request line and headers), and the door's
    refusals answered without the app.

    A new connection, and a kept-alive one once the next request's first byte arrives, has ``header_timeout``
    seconds to complete the head; then the connection is closed (with a 408 when part of a head arrived), so
    that connections that never finish their headers are not held. A head still arriving past
    ``max_header_bytes`` is answered 431 and the connection closed (a complete one is refused by the app, see
    ``service.app.RequestGuardMiddleware``). The time of each request's first byte goes into its scope
    (``REQUEST_STARTED``).

    ``refuse_early`` (``service.door.Door.refuse_early``) is asked about each request whose head has just been
    parsed on a kept-alive connection with no response in progress, no ``Expect: 100-continue`` and a head within
    its limit. An error it returns is answered at once, the connection kept alive, and no ASGI task is made: the
    request's body is dropped as it arrives, within ``body_timeout`` of its first byte (else the connection
    closes).
    """

    def __init__(self, *args: Any, header_timeout: float, max_header_bytes: int,
                 on_header_timeout: Callable[[], None] = lambda: None,
                 refuse_early: Callable[[Any], EarlyRefusal | None] | None = None, body_timeout: float = 5.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.on_header_timeout = on_header_timeout
        self.refuse_early = refuse_early
        self.body_timeout = body_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._first_byte_at: float | None = None
        self._head_bytes = 0  # bytes received since the head began (an upper bound of the head's size)
        self._in_body = False  # a head is complete and its body is arriving: the bytes received are not a head
        self._closer: _LingeringTransport | None = None  # the transport, wrapped (connection_made)
        self._parsing_head = False  # in on_headers_complete: a task started now is for the head just parsed
        self._refused: RequestResponseCycle | None = None  # answered here, its body still arriving
        self._refused_until = 0.0  # when that body must have arrived (time.monotonic())
        self._body_timer: asyncio.TimerHandle | None = None  # bounds its arrival once it comes in pieces

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._closer = _LingeringTransport(transport, self)
        super().connection_made(self._closer)  # type: ignore[arg-type]
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        self._stop_body_timer()
        if self._closer is not None and self._closer.lingering:
            self._closer.end()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closer is not None and self._closer.lingering:
            self._closer.drop(data)
            return
        if self._refused is not None and self._body_timer is None:  # a refused request's body comes in pieces
            self._body_timer = self.loop.call_later(
                max(0.0, self._refused_until - time.monotonic()), self._refused_body_timed_out)
        in_head = not self._in_body
        if in_head:  # these bytes begin or continue a request's head
            if self._first_byte_at is None:
                self._first_byte_at = time.monotonic()
            self._head_bytes += len(data)
        super().data_received(data)
        if in_head and not self._in_body and self._first_byte_at is not None and not self.transport.is_closing():
            # A head is still incomplete after these bytes (most arrive whole, and need no timer).
            if self._head_bytes > self.max_header_bytes:
                self.transport.write(_error_response(
                    431, "headers_too_large", f"the request line and headers exceed {self.max_header_bytes} bytes"))
                self.transport.close()
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    max(0.0, self._first_byte_at + self.header_timeout - time.monotonic()), self._head_timed_out)

    def on_headers_complete(self) -> None:
        self.scope[REQUEST_STARTED] = self._first_byte_at or time.monotonic()  # type: ignore[literal-required]
        self._parsing_head = True
        try:
            super().on_headers_complete()  # the request's task is created (not started), or its answer sent
        finally:
            self._parsing_head = False
        self._first_byte_at = None
        self._head_bytes = 0
        self._in_body = True
        self._stop_head_timer()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = False
        if self._refused is not None and self._refused is self.cycle:  # its body is all here and dropped
            self._refused.more_body = False
            self._refused = None
            self._stop_body_timer()
            if self.timeout_keep_alive_task is None and not self.transport.is_closing():
                self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                    self.timeout_keep_alive_handler)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if (self._parsing_head and self.refuse_early is not None and app is self.app and cycle.keep_alive
                and not cycle.waiting_for_100_continue and self._head_bytes <= self.max_header_bytes):
            error = self.refuse_early(cycle.scope)
            if error is not None:
                self._answer_at_once(cycle, error)
                return
        super()._start_asgi_task(cycle, app)

    def _answer_at_once(self, cycle: RequestResponseCycle, error: EarlyRefusal) -> None:
        """Answer ``cycle``'s request with ``error`` now; its body, still to be parsed, is dropped (uvicorn drops
        the body of a request whose response is complete)."""
        self.transport.write(_error_response(error.status_code, error.code, error.message, error.headers(),
                                             close=False, default_headers=self.server_state.default_headers))
        cycle.response_started = cycle.response_complete = True
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope), cycle.scope["method"],
                                    get_path_with_query_string(cycle.scope), cycle.scope["http_version"],
                                    error.status_code)
        self._refused = cycle  # until its body has arrived (most come with the head: no timer is needed)
        started = cycle.scope.get(REQUEST_STARTED) or time.monotonic()  # type: ignore[attr-defined]
        self._refused_until = started + self.body_timeout
        self.on_response_complete()  # counted; the keep-alive timer runs, reading goes on

    def _refused_body_timed_out(self) -> None:
        self._body_timer = None
        if self._refused is not None and self._refused is self.cycle and not self.transport.is_closing():
            self._refused.more_body = False  # nothing is waited for: the connection closes now
            self.transport.close()

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._in_body:
            return
        self.on_header_timeout()
        if self._first_byte_at is not None:  # part of a head arrived: a slow client learns why it is cut off
            self.transport.write(_error_response(408, "header_timeout", "the request's headers did not arrive "
                                                 f"within {self.header_timeout:g} s"))
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server with the service's drain.

    On SIGTERM or SIGINT, ``on_drain`` runs at once (the app then answers /readyz and new requests with 503 and
    Connection: close) while the listener stays open for ``grace`` seconds, so that load balancers see the
    service leave and kept-alive clients are told to go rather than reset. Then uvicorn's own shutdown closes
    the listener and waits for the requests already accepted, until ``drain_timeout`` after the signal. A
    second signal ends the grace period at once.
    """

    def __init__(self, config: uvicorn.Config, *, on_drain: Callable[[], None], grace: float,
                 drain_timeout: float) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.grace = min(grace, drain_timeout)
        self.drain_timeout = drain_timeout
        self.drain_started: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in a signal handler: anything more than setting flags happens in a loop callback.
        if self.drain_started is None and self._loop is not None:
            self.drain_started = time.monotonic()
            self._loop.call_soon_threadsafe(self._begin_drain, sig, frame)
            return
        if self._loop is not None and self.drain_started is not None:
            self._loop.call_soon_threadsafe(self._end_grace, sig, frame)
            return
        super().handle_exit(sig, frame)  # before start-up: uvicorn's own behaviour

    def _begin_drain(self, sig: int, frame: FrameType | None) -> None:
        self.on_drain()
        if self.should_exit or self._grace_timer is not None:
            return
        logger.info("draining: /readyz and new requests answer 503; the listener closes in %.1f s and the process "
                    "exits within %.1f s", self.grace, self.drain_timeout)
        assert self._loop is not None
        self._grace_timer = self._loop.call_later(self.grace, self._end_grace, sig, frame)

    def _end_grace(self, sig: int, frame: FrameType | None) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        assert self.drain_started is not None
        left = self.drain_timeout - (time.monotonic() - self.drain_started)
        self.config.timeout_graceful_shutdown = max(0.1, left - EXIT_MARGIN)  # type: ignore[assignment]
        super().handle_exit(sig, frame)


def _drain(app: FastAPI) -> None:
    predictor = getattr(app.state, "predictor", None)
    if predictor is not None:
        predictor.begin_drain()


def build_server(app: FastAPI, settings: Settings, **config: Any) -> Server:
    """A uvicorn server for ``app`` under ``settings``: header and keep-alive timeouts, the size of a request's
    head, and the drain; ``config`` overrides or adds ``uvicorn.Config`` options."""
    metrics = getattr(app.state, "metrics", None)
    door = getattr(app.state, "door", None)
    protocol = functools.partial(GuardedProtocol, header_timeout=settings.header_timeout,
                                 max_header_bytes=settings.max_header_bytes,
                                 on_header_timeout=metrics.header_timeouts.inc if metrics is not None else lambda: None,
                                 refuse_early=door.refuse_early if door is not None else None,
                                 body_timeout=settings.body_timeout)
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level, "http": protocol,
        "access_log": settings.access_log,
        "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": max(1.0, settings.drain_timeout),
        # The service decides which proxy headers it trusts (trust_forwarded_for, trust_request_start); uvicorn's
        # own rewriting of the client address from X-Forwarded-For (on for loopback peers) would bypass that.
        "proxy_headers": False, **config}
    return Server(uvicorn.Config(app, **options), on_drain=functools.partial(_drain, app),
                  grace=settings.drain_grace, drain_timeout=settings.drain_timeout)


def build_parser() -> argparse.ArgumentParser:
    """One option per setting, generated from the Settings fields so the two never disagree."""
    parser = argparse.ArgumentParser(
        prog="robustnorm-serve",
        description="Serve an image classifier whose normalization layers adapt to the traffic they see.",
        epilog=f"Every option can also be set in the environment as {ENV_PREFIX}<OPTION> (for example "
               f"{ENV_PREFIX}MAX_BATCH_SIZE=64) or in a TOML/JSON file given by --config-file. Keys "
               f"({ENV_PREFIX}API_KEYS, a JSON object of key -> tenant; {ENV_PREFIX}ADMIN_KEYS and "
               f"{ENV_PREFIX}METRICS_KEYS, key -> name) come only from the environment or the file. SIGTERM "
               f"drains: DRAIN_GRACE seconds still listening (new requests 503), exit within DRAIN_TIMEOUT. "
               f"'robustnorm models' lists the bundled models.",
    )
    for name, field in Settings.model_fields.items():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}]"
        if field.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
            continue
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(flag, default=argparse.SUPPRESS, choices=choices, metavar=name.upper(),
                            help=help_text + shown)
    return parser


def settle_garbage_collector(threshold: int) -> bool:
    """Collect once, freeze what is alive (the model, the libraries, the app: it lives as long as the process)
    out of the garbage collector's sight, and collect the youngest generation every ``threshold`` allocations.

    Python's defaults (700, 10, 10) run a collection of the youngest generation every 700 container
    allocations, which a busy server makes in a fraction of a millisecond, and now and then one of them walks
    every tracked object of the process. Those pauses stop the event loop and, holding the interpreter, the
    engine's thread, and every request in flight waits them out (at 32 clients the p99 doubled). Most of a
    request's objects die by reference counting anyway; the collector is needed only for cycles. Returns
    whether anything changed (``threshold`` 0: nothing)."""
    if threshold <= 0:
        return False
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(threshold, middle, oldest)
    logger.debug("garbage collector: %d objects frozen, youngest generation every %d allocations",
                 gc.get_freeze_count(), threshold)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    flags = vars(parser.parse_args(argv))
    try:
        settings = Settings(**flags)
    except (ValidationError, ValueError) as error:
        parser.error(str(error))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.is_factory_model and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # 'module:factory' resolves from the working directory, as with uvicorn
    from .app import create_app
    from .engines import load_engine
    from .engines.loader import settle_torch_threads

    try:
        engine = load_engine(settings)
    except (ValueError, OSError, ImportError) as error:
        logger.error("cannot serve model %r: %s", settings.model or "(the bundled default)", error)
        return 1
    settle_torch_threads(engine)
    app = create_app(settings, engine_factory=lambda _: engine)
    server = build_server(app, settings)
    settle_garbage_collector(settings.gc_threshold)
    sys.setswitchinterval(settings.switch_interval)
    logger.info("threads wait at most %.2g ms for the interpreter (switch interval)", 1e3 * sys.getswitchinterval())
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl+C during the shutdown, as with uvicorn.run
        server.run()
    return 0 if server.started else 3  # 3: uvicorn's status for a failed start-up


if __name__ == "__main__":
    sys.exit(main())
