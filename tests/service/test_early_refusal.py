"""Refusals answered by the HTTP protocol (``service.cli.GuardedProtocol`` asking ``service.door.Door``) as soon as
a request's head is parsed, with no ASGI task: the same answers as the app's door gives, counted the same, and
the connection kept for the client's next request, whatever the body still to come does.

Two servers of the bundled model, one refusing in the protocol, the other (no door given to its protocol)
refusing in the app; the requests are the photographs of examples/ sent over raw sockets where the test is
about bytes on a connection.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from service_support import LiveServer, examples

from service.app import create_app
from service.settings import Settings

MODEL = "cifar10-resnet20-robustnorm"
BODY_TIMEOUT = 1.0
TENANT = "X-Tenant"


class EarlyServer(LiveServer):
    """A live server that counts the refusals its protocol answered itself."""

    early = 0


def _server(*, in_protocol: bool) -> LiveServer:
    settings = Settings(model=MODEL, device="cpu", request_deadline=5.0, trust_request_start=True,
                        body_timeout=BODY_TIMEOUT, batch_key="header", tenant_rate=1.0)
    app = create_app(settings, registry=CollectorRegistry())
    door = app.state.door
    if not in_protocol:
        app.state.door = None  # build_server gives its protocol no door: refusals go through the app
        server = LiveServer(app)
    else:
        refuse = door.refuse_early

        def counting(scope: Any) -> Any:
            error = refuse(scope)
            EarlyServer.early += error is not None
            return error

        door.refuse_early = counting
        server = EarlyServer(app)
    server.start()
    return server


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LiveServer, LiveServer]]:
    early, app_only = _server(in_protocol=True), _server(in_protocol=False)
    try:
        yield early, app_only
    finally:
        early.stop()
        app_only.stop()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return examples()["cat.jpg"]


def stale(tenant: str) -> dict[str, str]:
    """Headers of a request whose trusted proxy received it 100 s ago: past its deadline, refused 504."""
    return {"content-type": "image/jpeg", "x-request-start": f"t={int((time.time() - 100) * 1e6)}", TENANT: tenant}


def raw_request(body: bytes, headers: dict[str, str]) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{lines}\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One final response from ``sock`` (an interim ``100 Continue`` skipped): status, headers (lower-case
    names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
        if data.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in data:
            data = data.partition(b"\r\n\r\n")[2]
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in a response's body"
        rest += chunk
    assert len(rest) == length, "more bytes than one response"
    return int(lines[0].split()[1]), headers, rest


def counter(server: LiveServer, name: str, **labels: str) -> float:
    return server.app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def comparable(response: httpx.Response) -> dict[str, Any]:
    headers = {name: value for name, value in response.headers.items() if name != "date"}
    retry_after = headers.pop("retry-after", None)
    if retry_after is not None:
        assert int(retry_after) >= 1
    body = response.json()
    # The message of a quota refusal says when to retry, which differs by a few milliseconds between servers.
    return {"status": response.status_code, "headers": headers, "code": body["error"]["code"],
            "keys": sorted(body["error"]), "retry_after": retry_after is not None}


def test_the_protocol_refuses_as_the_app_does(servers: tuple[LiveServer, LiveServer], photo: bytes) -> None:
    early, app_only = servers
    answers = []
    for server in (early, app_only):
        before = EarlyServer.early
        refused_before = counter(server, "robustnorm_rejected_total", reason="deadline")
        quota_before = counter(server, "robustnorm_rejected_total", reason="tenant_rate")
        requests_before = counter(server, "robustnorm_requests_total", route="/predict", code="504")
        with httpx.Client(base_url=server.url, timeout=30) as client:
            late = client.post("/predict", content=photo, headers=stale("late"))
            assert late.json()["error"]["message"] == "the request's deadline passed before it could be queued"
            first = client.post("/predict", content=photo, headers={"content-type": "image/jpeg", TENANT: "quota"})
            over = client.post("/predict", content=photo, headers={"content-type": "image/jpeg", TENANT: "quota"})
        assert first.status_code == 200, first.text
        assert over.status_code == 429, over.text
        answers.append((comparable(late), comparable(over)))
        assert counter(server, "robustnorm_rejected_total", reason="deadline") == refused_before + 1
        assert counter(server, "robustnorm_rejected_total", reason="tenant_rate") == quota_before + 1
        assert counter(server, "robustnorm_requests_total", route="/predict", code="504") == requests_before + 1
        assert EarlyServer.early - before == (2 if server is early else 0)
    assert answers[0] == answers[1]
    assert answers[0][0]["status"] == 504 and answers[0][1]["retry_after"]
    assert "connection" not in answers[0][0]["headers"], "a refusal keeps the connection"


def test_after_a_refusal_in_the_protocol_the_connection_serves_the_next_request(
        servers: tuple[LiveServer, LiveServer], photo: bytes) -> None:
    early, _ = servers
    before = EarlyServer.early
    fresh = {"content-type": "image/jpeg", TENANT: "next"}
    with socket.create_connection(("127.0.0.1", early.port), timeout=30) as sock:
        sock.sendall(raw_request(photo, stale("next")))
        assert read_response(sock)[0] == 504
        sock.sendall(raw_request(photo, fresh))
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == "cat"
        # Pipelined: a refusal and a request in one write are answered in order on the one connection.
        sock.sendall(raw_request(photo, stale("next")) + raw_request(photo, {**fresh, TENANT: "next2"}))
        assert read_response(sock)[0] == 504
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["predictions"][0]["label"] == "cat"
    assert EarlyServer.early - before == 2


def test_a_refusal_is_answered_before_its_body_and_the_body_is_dropped(servers: tuple[LiveServer, LiveServer],
                                                                       photo: bytes) -> None:
    early, _ = servers
    before = EarlyServer.early
    request = raw_request(photo, stale("pieces"))
    head_end = request.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", early.port), timeout=30) as sock:
        sock.sendall(request[:head_end + 100])
        status, headers, _ = read_response(sock)  # answered with most of its body still to come
        assert status == 504 and headers.get("connection") != "close"
        time.sleep(0.2)
        sock.sendall(request[head_end + 100:])
        # The rest of the body is not taken for a request: the next one is answered.
        sock.sendall(raw_request(photo, {"content-type": "image/jpeg", TENANT: "pieces"}))
        assert read_response(sock)[0] == 200
    assert EarlyServer.early - before == 1


def test_a_refused_body_that_stalls_closes_the_connection_after_the_body_timeout(
        servers: tuple[LiveServer, LiveServer], photo: bytes) -> None:
    early, _ = servers
    request = raw_request(photo, stale("stall"))
    head_end = request.index(b"\r\n\r\n") + 4
    with socket.create_connection(("127.0.0.1", early.port), timeout=30) as sock:
        sent = time.monotonic()
        sock.sendall(request[:head_end + 10])
        assert read_response(sock)[0] == 504
        time.sleep(0.3)
        sock.sendall(request[head_end + 10:head_end + 20])  # a trickle: it keeps coming, never all of it
        sock.settimeout(10 * BODY_TIMEOUT)
        assert sock.recv(65536) == b"", "the connection should close once the body timeout is past"
        assert time.monotonic() - sent < 5 * BODY_TIMEOUT


@pytest.mark.parametrize("extra", [{"expect": "100-continue"}, {"connection": "close"}],
                         ids=["expect-100-continue", "connection-close"])
def test_requests_the_protocol_leaves_to_the_app_are_refused_there(servers: tuple[LiveServer, LiveServer],
                                                                   photo: bytes, extra: dict[str, str]) -> None:
    early, _ = servers
    before = EarlyServer.early
    with socket.create_connection(("127.0.0.1", early.port), timeout=30) as sock:
        sock.sendall(raw_request(photo, {**stale("left"), **extra}))
        status, _, body = read_response(sock)
    assert status == 504 and json.loads(body)["error"]["code"] == "deadline"
    assert EarlyServer.early == before


def test_with_keys_set_the_protocol_refuses_only_requests_with_a_valid_key(photo: bytes) -> None:
    settings = Settings(model=MODEL, device="cpu", trust_request_start=True, batch_key="api_key",
                        api_keys={"tenant-key-1": "acme"})
    app = create_app(settings, registry=CollectorRegistry())
    server = LiveServer(app)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            headers = {key: value for key, value in stale("").items() if key != TENANT}
            missing = client.post("/predict", content=photo, headers=headers)
            wrong = client.post("/predict", content=photo, headers={**headers, "X-API-Key": "not-a-key"})
            valid = client.post("/predict", content=photo, headers={**headers, "X-API-Key": "tenant-key-1"})
        assert (missing.status_code, wrong.status_code, valid.status_code) == (401, 401, 504)
        assert valid.json()["error"]["code"] == "deadline"
        assert counter(server, "robustnorm_requests_total", route="/predict", code="401") == 2
    finally:
        server.stop()
