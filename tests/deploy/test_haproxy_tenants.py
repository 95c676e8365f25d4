"""The shipped haproxy.cfg routes the requests of one tenant to one replica, and stamps X-Request-Start.

HAProxy (Debian's) runs the shipped config with its DNS server template replaced by loopback servers: small HTTP
stubs in this process that answer which replica they are and the X-Request-Start they were sent, so that the
routing itself is tested, without models.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from deploy_support import HAPROXY_CONFIG, Process, free_port, require_tool, wait_until

TENANTS = [f"tenant-{index}" for index in range(12)]


class Replica(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
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


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[int]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Replica) for _ in range(3)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [server.server_port for server in servers]
    for server in servers:
        server.shutdown()


def config(workdir: Path, ports: list[int], lb: int, stats: int) -> Path:
    text = HAPROXY_CONFIG.read_text()
    servers = "\n".join(f"    server replica{i} 127.0.0.1:{port} check" for i, port in enumerate(ports, 1))
    text, templates = re.subn(r"^\s*server-template .*$", servers, text, flags=re.M)
    text, binds = re.subn(r"^(\s*)bind :8080$", rf"\g<1>bind 127.0.0.1:{lb}", text, flags=re.M)
    text, stats_binds = re.subn(r"^(\s*)bind :8405$", rf"\g<1>bind 127.0.0.1:{stats}", text, flags=re.M)
    assert (templates, binds, stats_binds) == (1, 1, 1), "haproxy.cfg changed shape; update this test"
    path = workdir / f"haproxy-{len(ports)}.cfg"
    path.write_text(text)
    return path


class Balancer:
    """HAProxy with the shipped config in front of ``ports``."""

    def __init__(self, workdir: Path, ports: list[int]) -> None:
        binary = require_tool("haproxy", "apt-get install -y haproxy")
        self.port, stats = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process(f"haproxy-{len(ports)}", [binary, "-db", "-f", str(config(workdir, ports, self.port,
                                                                                            stats))], workdir)
        stats_url = f"http://127.0.0.1:{stats}/stats;csv"

        def every_server_up() -> bool:
            try:
                lines = httpx.get(stats_url, timeout=2).text.splitlines()
            except httpx.TransportError:
                return False
            rows = [line.split(",") for line in lines if line.startswith("replicas,replica")]
            return len(rows) == len(ports) and all(row[17].startswith("UP") for row in rows)

        wait_until(every_server_up, 30, "HAProxy reports every stub replica UP")

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
