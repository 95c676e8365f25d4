"""Hostile clients against the real service: headers and bodies that never finish, stalled uploads, clients
that hang up, odd multipart bodies.

The service runs as ``python -m service`` (its own process, so that its resident memory can be measured) with
the bundled model; requests carry the photographs of examples/. Every connection is on loopback, and every
loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from service_support import LiveServer, ServiceProcess, examples, serve

from service.app import create_app
from service.settings import MiB, Settings

logger = logging.getLogger(__name__)

MODEL = "cifar10-resnet20-robustnorm"
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MAX_UPLOADS = 8
MAX_BODY = 4 * MiB
SLACK = 1.5  # seconds a loaded machine may add to a timeout before the connection is seen closed

# The slowloris: 200 connections, all on loopback.
HEADER_CLIENTS, IDLE_CLIENTS, UPLOAD_CLIENTS = 80, 40, 80
UPLOAD_SENT = 3 * MiB  # of the MAX_BODY each stalled upload declares
HOLD_LIMIT = 12.0  # seconds a hostile connection is kept at most by the test itself


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    process = ServiceProcess(
        "--model", MODEL, "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
        "--max-uploads", str(MAX_UPLOADS), "--max-request-bytes", str(MAX_BODY), "--max-image-bytes", str(MAX_BODY),
        "--drain-grace", "0", "--log-level", "warning", log=tmp_path_factory.mktemp("hostile") / "service.log")
    process.wait_ready()
    yield process
    assert process.stop() in (0, -signal.SIGTERM)
    output = process.output()
    assert "Traceback" not in output and "ERROR" not in output, output


@pytest.fixture(scope="module")
def photo() -> bytes:
    return examples()["cat.jpg"]


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def head(path: str = "/predict", *, length: int, media_type: str = "image/jpeg") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {media_type}\r\nContent-Length: {length}\r\n\r\n"
            ).encode()


def read_until_closed(sock: socket.socket, limit: float, *, reset_ends: bool = True) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when it closed it (seconds from now). A reset
    ends it too, or, with ``reset_ends=False``, raises."""
    started, received = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            if not reset_ends:
                raise
            break
        if not chunk:
            break
        received += chunk
    else:
        raise AssertionError(f"the server held the connection for {limit} s; it sent {received[:200]!r}")
    return received, time.monotonic() - started


# -- the slowloris --------------------------------------------------------------------------------------------


@dataclass
class Held:
    kind: str
    seconds: float  # from connecting until the server closed the connection
    answer: bytes  # what the server sent before it closed


async def hold(port: int, kind: str) -> Held:
    """One hostile connection: a head that never ends, no byte at all, or a body that stalls. One more byte
    every half second, until the server closes the connection (or HOLD_LIMIT passes)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        if kind == "headers":
            writer.write(b"POST /predict HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        elif kind == "upload":
            writer.write(head(length=MAX_BODY))
            chunk = bytes(64 * 1024)
            for _ in range(UPLOAD_SENT // len(chunk)):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), HOLD_LIMIT)
        while time.monotonic() - started < HOLD_LIMIT:
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.5)
            except asyncio.TimeoutError:
                if kind != "idle":
                    writer.write(b"a")
                continue
            if not data:
                break
            answer += data
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()
    return Held(kind, time.monotonic() - started, answer)


async def slowloris(service: ServiceProcess, photo: bytes) -> tuple[list[Held], list[float], list[int]]:
    """200 hostile connections; meanwhile a normal client asks every quarter second, and the server's resident
    memory is sampled every 0.1 s."""
    kinds = ["headers"] * HEADER_CLIENTS + ["idle"] * IDLE_CLIENTS + ["upload"] * UPLOAD_CLIENTS
    hostile = asyncio.gather(*(hold(service.port, kind) for kind in kinds))
    latencies: list[float] = []
    memory: list[int] = []

    async def sample_memory() -> None:
        while not hostile.done():
            memory.append(service.rss_bytes())
            await asyncio.sleep(0.1)

    async def normal_client() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
            until = time.monotonic() + BODY_TIMEOUT + 2 * SLACK
            while time.monotonic() < until:
                started = time.monotonic()
                response = await client.post("/predict", content=photo, headers={"Content-Type": "image/jpeg"})
                assert response.status_code == 200, response.text
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample_memory())
    await asyncio.sleep(0.5)  # the hostile connections are open, the uploads under way
    await normal_client()
    held = await hostile
    await sampler
    return held, latencies, memory


def test_slowloris_is_cut_off_while_normal_clients_are_served_and_memory_stays_bounded(
        service: ServiceProcess, photo: bytes) -> None:
    for _ in range(5):  # the steady state of a served request, before the baseline
        assert httpx.post(f"{service.url}/predict", content=photo, headers={"Content-Type": "image/jpeg"}
                          ).status_code == 200
    baseline = service.rss_bytes()
    before = metrics(service.url)

    held, latencies, memory = asyncio.run(slowloris(service, photo))

    after = metrics(service.url)
    by_kind = {kind: [h for h in held if h.kind == kind] for kind in ("headers", "idle", "upload")}
    # No hostile connection is held past its timeout.
    for h in by_kind["headers"] + by_kind["idle"]:
        assert h.seconds < HEADER_TIMEOUT + SLACK, h
    for h in by_kind["upload"]:
        assert h.seconds < BODY_TIMEOUT + SLACK, h
    assert all(h.answer.startswith(b"HTTP/1.1 408") for h in by_kind["headers"])
    assert all(h.answer == b"" for h in by_kind["idle"])
    # Every stalled upload either found no place (503) or ran out of time (408); at most MAX_UPLOADS at once.
    refused = metric(after, "robustnorm_rejected_total", reason="uploads_full") - metric(
        before, "robustnorm_rejected_total", reason="uploads_full")
    timed_out = metric(after, "robustnorm_rejected_total", reason="body_timeout") - metric(
        before, "robustnorm_rejected_total", reason="body_timeout")
    assert refused + timed_out == UPLOAD_CLIENTS and refused >= 1 and timed_out >= 1, (refused, timed_out)
    cut = metric(after, "robustnorm_header_timeouts_total") - metric(before, "robustnorm_header_timeouts_total")
    assert cut >= HEADER_CLIENTS + IDLE_CLIENTS
    # The normal client was answered promptly all along.
    assert len(latencies) >= 8 and max(latencies) < 3.0, latencies
    # Resident memory: without the limit on uploads the stalled bodies alone would hold UPLOAD_CLIENTS x
    # UPLOAD_SENT (240 MiB); with it, MAX_UPLOADS of them at most (24 MiB, plus copies while they are read).
    growth = max(memory) - baseline
    assert growth < 128 * MiB, f"resident memory grew by {growth / MiB:.0f} MiB"
    logger.info(f"slowloris: RSS {baseline / MiB:.0f} MiB before, peak +{growth / MiB:.0f} MiB; "
          f"normal requests {len(latencies)}, slowest {max(latencies):.3f} s; uploads refused {refused:.0f}, "
          f"timed out {timed_out:.0f}; connections cut at the header timeout {cut:.0f}; held at most "
          + ", ".join(f"{kind} {max(h.seconds for h in hs):.2f} s" for kind, hs in by_kind.items()))


# -- bodies ---------------------------------------------------------------------------------------------------


def test_a_trickled_body_gets_408_and_the_deadline_counts_from_the_first_byte(service: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(head(length=5000) + b"abc")
        started = time.monotonic()
        while time.monotonic() - started < BODY_TIMEOUT + SLACK:  # 2 bytes a second, never the whole body
            try:
                sock.sendall(b"x")
            except OSError:
                break
            time.sleep(0.5)
        answer, _ = read_until_closed(sock, SLACK)
    assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer.lower()
    assert b'"code":"body_timeout"' in answer
    # ?timeout= shorter than the body timeout: the deadline passes while the body arrives.
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(head("/predict?timeout=0.5", length=5000) + b"abc")
        answer, seconds = read_until_closed(sock, BODY_TIMEOUT + SLACK)
    assert answer.startswith(b"HTTP/1.1 504") and b'"code":"deadline"' in answer and seconds < BODY_TIMEOUT


def test_an_answer_before_the_body_is_read_closes_the_connection(service: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(head(length=MiB, media_type="text/plain") + bytes(1000))
        answer, seconds = read_until_closed(sock, SLACK)
    assert answer.startswith(b"HTTP/1.1 415") and b"connection: close" in answer.lower() and seconds < 1.0


def test_a_refusal_waits_for_the_rest_of_a_body_in_flight(service: ServiceProcess) -> None:
    """A refusal decided from the head alone (415 here; a draining replica's 503 the same) is sent once the rest
    of the body has arrived, not while the client (or a proxy in front) is still sending it: a connection closed
    with bytes unread is reset, and a reset can destroy the answer before the sender reads it. A body that
    pauses is not waited for."""
    body = bytes(200_000)
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(head(length=len(body), media_type="text/plain") + body[:100_000])
        sock.settimeout(0.1)  # under LINGER_IDLE (service.app): the service is still waiting for the rest
        with pytest.raises(TimeoutError):
            early = sock.recv(65536)
            raise AssertionError(f"answered before the body was complete: {early[:80]!r}")
        sock.sendall(body[100_000:])
        sock.settimeout(SLACK)
        answer = b""
        while not answer.endswith(b"}}"):  # the whole JSON error; a reset would raise here
            chunk = sock.recv(65536)
            assert chunk, f"closed before the whole answer: {answer!r}"
            answer += chunk
    # The body was read in full, so the connection could have carried the client's next request.
    assert answer.startswith(b"HTTP/1.1 415") and b"connection: close" not in answer.lower(), answer[:200]
    # A body that pauses longer than that is not waited for: the answer comes, and the connection closes.
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(head(length=len(body), media_type="text/plain") + body[:1000])
        answer, seconds = read_until_closed(sock, SLACK, reset_ends=False)
    assert answer.startswith(b"HTTP/1.1 415") and seconds < 1.0, (answer, seconds)


def test_a_client_still_sending_a_refused_body_reads_the_answer(service: ServiceProcess) -> None:
    """Refused from its head (413 here; 503 ``uploads_full`` is closed the same way) while it sends megabytes
    before reading anything: the service ends its sending side and drops what still arrives (at most 1 s and 8
    MiB), so that closing the connection does not reset it before the client has read the answer."""
    for attempt in range(10):  # without the linger, most attempts see a reset (a race: each may be lucky)
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(head(length=100 * MiB))
            for _ in range(64):  # 4 MiB; a reset while sending fails the test
                sock.sendall(bytes(65536))
            answer, _ = read_until_closed(sock, SLACK, reset_ends=False)
        assert answer.startswith(b"HTTP/1.1 413"), (attempt, answer[:200])


def test_uploads_beyond_the_limit_get_503_but_a_body_sent_in_one_piece_is_served(
        service: ServiceProcess, photo: bytes) -> None:
    stalled = []
    try:
        for _ in range(MAX_UPLOADS):
            sock = socket.create_connection(("127.0.0.1", service.port))
            sock.sendall(head(length=MAX_BODY) + bytes(256 * 1024))
            stalled.append(sock)
        time.sleep(0.3)  # every one holds a place now
        with socket.create_connection(("127.0.0.1", service.port)) as extra:
            extra.sendall(head(length=MAX_BODY) + bytes(256 * 1024))
            answer, _ = read_until_closed(extra, SLACK)
        assert answer.startswith(b"HTTP/1.1 503") and b'"code":"uploads_full"' in answer
        assert b"retry-after: 1" in answer.lower()
        served = httpx.post(f"{service.url}/predict", content=photo, headers={"Content-Type": "image/jpeg"})
        assert served.status_code == 200, served.text
    finally:
        for sock in stalled:
            sock.close()


def test_headers_too_large_are_refused(service: ServiceProcess) -> None:
    big = b"X-Big: " + b"a" * (64 * 1024) + b"\r\n"
    with socket.create_connection(("127.0.0.1", service.port)) as sock:  # the whole head in one piece
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + big + b"\r\n")
        answer, _ = read_until_closed(sock, SLACK)
    assert answer.startswith(b"HTTP/1.1 431") and b'"code":"headers_too_large"' in answer
    with socket.create_connection(("127.0.0.1", service.port)) as sock:  # a head that keeps growing
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
        time.sleep(0.1)
        sock.sendall(big)
        answer, _ = read_until_closed(sock, SLACK)
    assert answer.startswith(b"HTTP/1.1 431") and b'"code":"headers_too_large"' in answer


# -- multipart, schema, HEAD ----------------------------------------------------------------------------------


def test_multipart_oddities_get_clear_answers(service: ServiceProcess, photo: bytes) -> None:
    url = f"{service.url}/predict"
    long_name = httpx.post(url, files=[("image", ("a" * 10_000 + ".jpg", photo, "image/jpeg"))])
    assert long_name.status_code == 200, long_name.text  # file names are not used
    fields = {f"field{i}": "x" for i in range(1000)}
    many = httpx.post(url, data=fields, files=[("image", ("a.jpg", photo, "image/jpeg"))])
    assert many.status_code == 413 and "1001 parts" in many.json()["error"]["message"]
    one_field = httpx.post(url, data={"note": "x"}, files=[("image", ("a.jpg", photo, "image/jpeg"))])
    assert one_field.status_code == 422 and "'note'" in one_field.json()["error"]["message"]
    empty = httpx.post(url, content=b"--b--\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert empty.status_code == 422 and "no image" in empty.json()["error"]["message"]
    body = httpx.get(f"{service.url}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
    multipart = body["content"]["multipart/form-data"]["schema"]
    assert multipart["required"] == ["image"] and multipart["properties"]["image"]["minItems"] == 1
    assert body["content"]["application/json"]["schema"]["properties"]["images"]["minItems"] == 1


def test_head_requests_on_the_probes(service: ServiceProcess) -> None:
    for path in ("/healthz", "/readyz"):
        answer = httpx.head(f"{service.url}{path}")
        assert answer.status_code == 200 and answer.content == b"", path


# -- clients that hang up (in process, to see the log) --------------------------------------------------------


@pytest.fixture(scope="module")
def patient_server() -> Iterator[LiveServer]:
    """Batches wait a second for company, so that a request stays queued long enough to hang up on it."""
    settings = Settings(model=MODEL, device="cpu", max_wait=1.0, eager_batches=False)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


def stats(server: LiveServer) -> dict:
    return httpx.get(f"{server.url}/v1/stats").json()


def test_a_client_gone_mid_upload_is_499_at_debug_level(patient_server: LiveServer,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="service")
    before = metrics(patient_server.url)
    with socket.create_connection(("127.0.0.1", patient_server.port)) as sock:
        sock.sendall(head(length=5000) + b"abc")
        time.sleep(0.5)
    until = time.monotonic() + 5
    while metric(metrics(patient_server.url), "robustnorm_requests_total", route="/predict", code="499") == metric(
            before, "robustnorm_requests_total", route="/predict", code="499"):
        assert time.monotonic() < until, "the hang-up was never counted as 499"
        time.sleep(0.05)
    after = metrics(patient_server.url)
    assert metric(after, "robustnorm_requests_total", route="/predict", code="500") == 0
    assert any(r.levelno == logging.DEBUG and "hung up" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_client_gone_mid_queue_is_499_and_its_images_never_run(patient_server: LiveServer, photo: bytes,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="service")
    images_before = stats(patient_server)["images"]
    with socket.create_connection(("127.0.0.1", patient_server.port)) as sock:
        sock.sendall(head(length=len(photo)) + photo)
        until = time.monotonic() + 5
        while stats(patient_server)["queued_images"] != 1:
            assert time.monotonic() < until, "the request never reached the queue"
            time.sleep(0.02)
    hung_up = time.monotonic()
    while stats(patient_server)["queued_images"] != 0:
        assert time.monotonic() - hung_up < 0.5, "the queued image stayed after its client left"
        time.sleep(0.02)
    time.sleep(1.5)  # past the batch's wait: had the image stayed, it would have run by now
    assert stats(patient_server)["images"] == images_before
    codes = metrics(patient_server.url)
    assert metric(codes, "robustnorm_requests_total", route="/predict", code="499") >= 1
    assert metric(codes, "robustnorm_requests_total", route="/predict", code="500") == 0
    assert any(r.levelno == logging.DEBUG and "hung up" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    answer = httpx.post(f"{patient_server.url}/predict", content=photo, headers={"Content-Type": "image/jpeg"})
    assert answer.status_code == 200
