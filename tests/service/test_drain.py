"""The drain on SIGTERM, with a real ``python -m service`` process and kept-alive connections in flight.

At the signal, /readyz answers 503 at once while the listener stays open for the grace period: new requests on
kept-alive connections get 503 with Connection: close (never a reset), and every request accepted before the
signal is answered, also those still queued when the listener closes. The process exits within the drain
timeout.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from service_support import ServiceProcess, examples

logger = logging.getLogger(__name__)

GRACE = 1.5
DRAIN_TIMEOUT = 8.0
MAX_WAIT = 2.5  # a queued request waits this long for company: still queued when the listener closes
KEPT_ALIVE = 8
IN_FLIGHT = 4


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceProcess]:
    process = ServiceProcess("--model", "cifar10-resnet20-robustnorm", "--drain-grace", str(GRACE),
                             "--drain-timeout", str(DRAIN_TIMEOUT), "--max-wait", str(MAX_WAIT),
                             "--no-eager-batches", "--log-level", "info", log=tmp_path / "service.log")
    process.wait_ready()
    yield process
    process.stop()


def predict(client: httpx.Client, photo: bytes) -> httpx.Response:
    return client.post("/predict", content=photo, headers={"Content-Type": "image/jpeg"})


def slow_upload(port: int, photo: bytes, sent: threading.Event, resume: threading.Event) -> bytes:
    """A request whose headers and half its body come before the signal, the rest after it."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        half = len(photo) // 2
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(photo) + photo[:half])
        sent.set()
        resume.wait(timeout=10)
        sock.sendall(photo[half:])
        sock.settimeout(DRAIN_TIMEOUT)
        answer = b""
        while not answer.endswith(b"}") or b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_sigterm_drains_with_the_listener_open_then_exits_in_time(service: ServiceProcess) -> None:
    photo = examples()["cat.jpg"]
    clients = [httpx.Client(base_url=service.url, timeout=30) for _ in range(KEPT_ALIVE)]
    pool = ThreadPoolExecutor(max_workers=KEPT_ALIVE + IN_FLIGHT + 1)
    try:
        for client in clients:  # every connection kept alive before the signal
            assert client.get("/v1/model").status_code == 200
        body_sent, resume_body = threading.Event(), threading.Event()
        upload = pool.submit(slow_upload, service.port, photo, body_sent, resume_body)
        in_flight: list[Future[httpx.Response]] = [
            pool.submit(predict, httpx.Client(base_url=service.url, timeout=30), photo) for _ in range(IN_FLIGHT)]
        assert body_sent.wait(timeout=10)
        until = time.monotonic() + 10
        while httpx.get(f"{service.url}/v1/stats").json()["queued_images"] < IN_FLIGHT:
            assert time.monotonic() < until, "the requests in flight never reached the queue"
            time.sleep(0.02)

        service.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        ready = clients[0].get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        assert ready.headers["connection"] == "close"
        assert time.monotonic() - signalled < 0.5, "/readyz did not turn 503 at once"
        resume_body.set()

        def refused_while_listening(client: httpx.Client) -> list[httpx.Response]:
            """New requests during the grace period: every one answered 503 with Connection: close."""
            answers = []
            while time.monotonic() - signalled < GRACE - 0.4:
                try:
                    answers.append(predict(client, photo))
                except httpx.ConnectError:
                    # A thread starved on a busy machine may reach its connect after the grace period; a
                    # refusal seen before the grace period is over means the listener closed early.
                    refused_after = time.monotonic() - signalled
                    assert refused_after >= GRACE - 0.1, f"connection refused {refused_after:.2f} s after SIGTERM"
                    break
                time.sleep(0.05)
            return answers

        refused = [answer for future in [pool.submit(refused_while_listening, c) for c in clients[1:]]
                   for answer in future.result()]
        assert len(refused) >= KEPT_ALIVE - 1
        for answer in refused:
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "draining", answer.text
            assert answer.headers["connection"] == "close"

        for future in in_flight:  # accepted before the signal, still queued when the listener closed
            answer = future.result(timeout=DRAIN_TIMEOUT)
            assert answer.status_code == 200, answer.text
            assert answer.headers["connection"] == "close"
        uploaded = upload.result(timeout=DRAIN_TIMEOUT)
        assert uploaded.startswith(b"HTTP/1.1 200"), uploaded[:300]

        with pytest.raises(httpx.ConnectError):  # the listener is closed once the grace period is over
            httpx.get(f"{service.url}/healthz")
        service.process.wait(timeout=DRAIN_TIMEOUT)
        exited = time.monotonic() - signalled
    finally:
        for client in clients:
            client.close()
        pool.shutdown(wait=False, cancel_futures=True)
    logger.info("drain: %d new requests refused with 503 during the grace period, %d accepted before the "
                "signal answered 200, exit %.2f s after SIGTERM", len(refused), IN_FLIGHT + 1, exited)
    assert exited <= DRAIN_TIMEOUT, f"the process exited {exited:.1f} s after SIGTERM"
    assert exited >= GRACE, "the listener closed before the grace period was over"
    assert service.process.returncode in (0, -signal.SIGTERM)
    output = service.output()
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "draining" in output
