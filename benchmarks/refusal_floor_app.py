"""The least an ASGI app can do to refuse a request: read its body and answer 429 with ``Retry-After``.

``benchmarks/refusal_cost.py`` runs it under uvicorn as the service runs (uvloop, httptools) to measure the floor
of a refusal's cost beneath the service's own: what uvicorn itself spends per request.
"""

from __future__ import annotations

from typing import Any

BODY = b'{"error":{"code":"overloaded","message":"the service is overloaded; retry later"}}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode()),
           (b"retry-after", b"1")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while True:  # the body, so that the connection can carry the next request
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 429, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
