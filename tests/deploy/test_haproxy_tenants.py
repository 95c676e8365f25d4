"""The shipped haproxy.cfg routes the requests of one tenant to one replica, stamps X-Request-Start, refuses a
tenant over its quota (ROBUSTNORM_TENANT_RATE) and refuses predictions at once when the replicas' queues are long.

HAProxy (Debian's) runs the shipped config with its DNS server template replaced by loopback servers: small HTTP
stubs in this process that answer which replica they are and the X-Request-Start they were sent, so that the
routing itself is tested, without models.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from deploy_support import Process, free_port, loopback_haproxy_config, require_tool, wait_until

TENANTS = [f"tenant-{index}" for index in range(12)]
REPLICAS: list[ThreadingHTTPServer] = []  # the stub replicas while the module's fixture runs


class Replica(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        time.sleep(float(self.headers.get("x-stub-seconds") or 0))  # a slow replica, when a test asks for one
        tenant = self.headers.get("x-tenant")
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.seen[tenant] = self.server.seen.get(tenant, 0) + 1  # type: ignore[attr-defined]
        body = json.dumps({"replica": self.server.server_port,  # type: ignore[attr-defined]
                           "request_start": self.headers.get("x-request-start")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


class StubServer(ThreadingHTTPServer):
    request_queue_size = 256  # HAProxy opens up to its maxconn connections at once (the default backlog is 5)
    daemon_threads = True


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[int]]:
    servers = [StubServer(("127.0.0.1", 0), Replica) for _ in range(3)]
    for server in servers:
        server.seen, server.lock = {}, threading.Lock()  # type: ignore[attr-defined]  # requests per tenant
        threading.Thread(target=server.serve_forever, daemon=True).start()
    REPLICAS.extend(servers)
    yield [server.server_port for server in servers]
    for server in servers:
        server.shutdown()
    REPLICAS.clear()


def config(workdir: Path, ports: list[int], lb: int, stats: int) -> Path:
    path = workdir / f"haproxy-{len(ports)}.cfg"
    path.write_text(loopback_haproxy_config([f"127.0.0.1:{port}" for port in ports], f"127.0.0.1:{lb}",
                                            f"127.0.0.1:{stats}"))
    return path


class Balancer:
    """HAProxy with the shipped config in front of ``ports``."""

    def __init__(self, workdir: Path, ports: list[int], env: dict[str, str] | None = None) -> None:
        binary = require_tool("haproxy", "apt-get install -y haproxy")
        self.port, stats = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process(f"haproxy-{len(ports)}", [binary, "-db", "-f", str(config(workdir, ports, self.port,
                                                                                            stats))], workdir, env=env)
        stats_url = f"http://127.0.0.1:{stats}/stats;csv"

        def every_server_up() -> bool:
            try:
                lines = httpx.get(stats_url, timeout=2).text.splitlines()
            except httpx.TransportError:
                return False
            rows = [line.split(",") for line in lines if line.startswith(("replicas,replica", "uploads,replica"))]
            return len(rows) == 2 * len(ports) and all(row[17].startswith("UP") for row in rows)

        wait_until(every_server_up, 30, "HAProxy reports every stub replica UP in both backends")

    def replica(self, headers: dict[str, str]) -> int:
        return httpx.post(f"{self.url}/predict", content=b"x", headers=headers, timeout=10).json()["replica"]

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory, replicas: list[int]) -> Iterator[Balancer]:
    running = Balancer(tmp_path_factory.mktemp("haproxy"), replicas)
    yield running
    running.stop()


def test_each_tenant_sticks_to_one_replica(balancer: Balancer, replicas: list[int]) -> None:
    placed = {tenant: {balancer.replica({"X-Tenant": tenant}) for _ in range(4)} for tenant in TENANTS}
    assert all(len(where) == 1 for where in placed.values()), placed
    assert len({replica for where in placed.values() for replica in where}) >= 2, "every tenant on one replica"
    for header in ("X-API-Key", "Authorization"):
        value = "key-1" if header == "X-API-Key" else "Bearer key-1"
        # The key decides, whatever tenant header the requests also carry.
        assert len({balancer.replica({header: value, "X-Tenant": tenant}) for tenant in TENANTS}) == 1


def test_requests_without_a_tenant_are_spread(balancer: Balancer) -> None:
    assert len({balancer.replica({}) for _ in range(12)}) >= 2


def test_the_proxy_stamps_when_it_received_the_request(balancer: Balancer) -> None:
    answer = httpx.post(f"{balancer.url}/predict", content=b"x", headers={"X-Request-Start": "t=1"}).json()
    stamped = re.fullmatch(r"t=(\d{16})", answer["request_start"])
    assert stamped, answer
    assert abs(int(stamped.group(1)) / 1e6 - time.time()) < 60  # microseconds since the epoch, replacing the client's


def test_a_replica_leaving_moves_only_its_own_tenants(tmp_path: Path, balancer: Balancer,
                                                      replicas: list[int]) -> None:
    before = {tenant: balancer.replica({"X-Tenant": tenant}) for tenant in TENANTS}
    smaller = Balancer(tmp_path, replicas[:2])  # the third replica is gone
    try:
        after = {tenant: smaller.replica({"X-Tenant": tenant}) for tenant in TENANTS}
    finally:
        smaller.stop()
    moved = [tenant for tenant in TENANTS if before[tenant] != after[tenant]]
    assert all(before[tenant] == replicas[2] for tenant in moved), (before, after)


def _seen(tenant: str) -> int:
    """Requests of ``tenant`` the stub replicas received so far."""
    return sum(server.seen.get(tenant, 0) for server in REPLICAS)  # type: ignore[attr-defined]


def test_a_tenant_over_its_quota_is_refused_at_the_proxy(tmp_path: Path, replicas: list[int]) -> None:
    quota = 20  # predictions per second and tenant
    limited = Balancer(tmp_path, replicas, env={"ROBUSTNORM_TENANT_RATE": str(quota)})
    try:
        with httpx.Client(base_url=limited.url, timeout=10) as client:
            before = _seen("greedy")
            started = time.monotonic()
            answers = [client.post("/predict", content=b"x", headers={"X-Tenant": "greedy"}) for _ in range(150)]
            elapsed = time.monotonic() - started
            # Another tenant, and requests that name none, are not held back by the greedy one.
            others = [client.post("/predict", content=b"x", headers={"X-Tenant": "modest"}) for _ in range(2)]
            anonymous = [client.post("/predict", content=b"x") for _ in range(30)]
    finally:
        limited.stop()
    passed = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code == 429]
    assert len(passed) + len(refused) == len(answers), {answer.status_code for answer in answers}
    assert passed and refused, (len(passed), len(refused), elapsed)
    # The quota holds over the whole run (HAProxy's rate is over the last 100 ms: a window of slack).
    assert len(passed) <= quota * (elapsed + 0.2) + 2, (len(passed), elapsed)
    assert _seen("greedy") - before == len(passed)  # a refused request never reached a replica
    for answer in refused:
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error"]["code"] == "tenant_rate"
    assert [answer.status_code for answer in others] == [200, 200]
    assert all(answer.status_code == 200 for answer in anonymous)


def test_predictions_are_refused_at_once_when_the_queues_are_long(tmp_path: Path, replicas: list[int]) -> None:
    """One replica, each request taking 2 s there: 64 run at once (the servers' maxconn), 16 more may wait in the
    proxy's queue, and the rest are answered 429 at once, without reaching the replica."""
    slow = Balancer(tmp_path, replicas[:1])

    async def burst() -> list[tuple[int, float, str]]:
        async with httpx.AsyncClient(base_url=slow.url, timeout=30,
                                     limits=httpx.Limits(max_connections=None)) as client:
            async def one() -> tuple[int, float, str]:
                started = time.monotonic()
                answer = await client.post("/predict", content=b"x",
                                           headers={"X-Stub-Seconds": "2", "X-Tenant": "burst"})
                code = answer.json()["error"]["code"] if answer.status_code == 429 else ""
                return answer.status_code, time.monotonic() - started, code

            first = [asyncio.create_task(one()) for _ in range(80)]
            await asyncio.sleep(1.0)  # 64 running at the replica, 16 queued in the proxy
            later = [asyncio.create_task(one()) for _ in range(16)]
            return await asyncio.gather(*first, *later)

    try:
        before = _seen("burst")
        results = asyncio.run(burst())
    finally:
        slow.stop()
    assert [status for status, _, _ in results[:80]] == [200] * 80, results[:80]
    refused = results[80:]
    assert all(status == 429 and code == "overloaded" and seconds < 1.0 for status, seconds, code in refused), refused
    assert _seen("burst") - before == 80


def test_slow_uploads_do_not_take_the_places_of_quick_requests(tmp_path: Path, replicas: list[int]) -> None:
    """Bodies still arriving go through a backend of their own (32 places per replica, 8 more may wait): 48 stalled
    uploads hold 32 places and the queue, the rest are answered 503 at once, and a quick request still passes."""
    proxy = Balancer(tmp_path, replicas[:1])
    stalled: list[socket.socket] = []
    try:
        head = (b"POST /predict HTTP/1.1\r\nHost: test\r\nX-Tenant: slow\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 204800\r\n\r\n")
        for _ in range(48):
            connection = socket.create_connection(("127.0.0.1", proxy.port))
            connection.sendall(head + bytes(20 * 1024))  # more than HAProxy's first buffer, less than declared
            stalled.append(connection)
        time.sleep(1.5)
        started = time.monotonic()
        quick = httpx.post(f"{proxy.url}/predict", content=b"x", headers={"X-Tenant": "slow"}, timeout=10)
        quick_seconds = time.monotonic() - started
        answers = []
        for connection in stalled:  # what each has been answered so far (well within HAProxy's 5 s queue timeout)
            connection.setblocking(False)
            try:
                answers.append(connection.recv(4096))
            except BlockingIOError:
                answers.append(b"")  # still held: at a replica, or waiting for a place
    finally:
        for connection in stalled:
            connection.close()
        proxy.stop()
    assert quick.status_code == 200 and quick_seconds < 1.0, (quick.status_code, quick_seconds)
    refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503")]
    assert len(refused) == 8, [answer[:12] for answer in answers]
    assert all(b"uploads_full" in answer and b"retry-after: 1" in answer.lower() for answer in refused)
    assert answers.count(b"") == 40  # 32 at the replica, 8 waiting
