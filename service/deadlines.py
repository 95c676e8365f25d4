"""When a request's deadline starts: its first byte, or the time a trusted proxy in front received it.

A request's deadline counts from when it was accepted, so that time spent queued anywhere counts: in this
process from the first byte of the request (recorded by the HTTP protocol, ``REQUEST_STARTED`` in the scope),
and, when ``trust_request_start`` is set, from the ``X-Request-Start`` header the proxy in front adds as it
receives the request (``t=<seconds.fraction>`` as nginx's ``t=${msec}`` writes it, or ``t=<microseconds>`` as
HAProxy's ``t=%[date(0,us)]``; a bare number is read the same way). The header is wall-clock time; it is
converted to this process's monotonic clock, never placed after the first byte here, and ignored when it is
unreadable or implausibly old (a proxy's clock far off).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

REQUEST_START_HEADER = "x-request-start"
MAX_PROXY_LAG = 3600.0  # seconds: an older X-Request-Start says more about a clock than about a queue


def proxy_start(value: str) -> float | None:
    """Seconds since the epoch that an ``X-Request-Start`` value names, or None when it names none."""
    text = value.strip()
    if text.startswith("t="):
        text = text[2:]
    try:
        number = float(text)
    except ValueError:
        return None
    if not number > 0 or number == float("inf"):
        return None
    if "." in text:
        return number
    # Whole numbers: microseconds (16 digits today), milliseconds (13) or seconds (10).
    return number / 1e6 if number >= 1e14 else number / 1e3 if number >= 1e11 else number


def accepted_at(first_byte: float, header: str | None, *, trusted: bool) -> float:
    """The ``time.monotonic()`` from which a request's deadline counts."""
    if not trusted or not header:
        return first_byte
    started = proxy_start(header)
    if started is None:
        logger.debug("ignoring an unreadable X-Request-Start: %r", header[:64])
        return first_byte
    lag = time.time() - started  # how long ago the proxy received it
    at = time.monotonic() - lag
    if at > first_byte:  # the proxy's clock runs ahead of ours
        return first_byte
    if first_byte - at > MAX_PROXY_LAG:
        logger.debug("ignoring an X-Request-Start %.0f s before the request arrived here", first_byte - at)
        return first_byte
    return at


async def within(work: Awaitable[T], seconds: float | None) -> T:
    """``await work``, or :class:`asyncio.TimeoutError` after ``seconds`` (``None``: no limit).

    The request path awaits this several times per request: where Python has ``asyncio.timeout`` (3.11) the
    awaitable runs in the caller's task, where ``asyncio.wait_for`` would wrap a coroutine in a task of its own,
    which costs a turn of the event loop before it starts and another when it ends.
    """
    limit = None if seconds is None else max(0.0, seconds)
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(limit):
            return await work
    return await asyncio.wait_for(work, limit)  # pragma: no cover
