"""The service under overload and unfair tenants: goodput at a multiple of its capacity, and one tenant's flood.

Starts ``robustnorm-serve`` (from this interpreter's environment) on 127.0.0.1 with the bundled default model, a
request deadline of ``--deadline`` seconds and ``--trust-request-start`` (the load generator plays the proxy in
front: every request carries ``X-Request-Start: t=<microseconds>`` of its due time, so time spent in socket
queues counts against the deadline as it would behind HAProxy). Then:

1. capacity: closed loop at each of ``--concurrency`` clients (16, 32, 64); capacity = the most 200s per second
   (the saturation throughput);
2. overload: open loop, Poisson arrivals at ``--factor`` times the capacity; every request is counted by how it
   was answered (200, 429 with or without Retry-After, 503, 504, other, transport error, no answer), 200s later
   than the deadline (latency from the due time) are ``late``; goodput = 200s within the deadline per second;
   then the capacity again, as in 1; the goodput is reported against the mean of the two capacities (the check,
   ``goodput_of_capacity_mean``), against each, and the run with the median share is the one plotted;
3. fairness (a second server with ``--batch-key header``): light tenants alone at 10% of capacity each, then the
   same light tenants beside a heavy tenant offering its fair share of the capacity (capacity / tenants), then 10
   times that share; each tenant's answers and latency. The per-tenant quota is that fair share: the service's
   own ``--tenant-rate`` when it is alone, ROBUSTNORM_TENANT_RATE (the proxy's) behind HAProxy. The heavy
   tenant's client runs in a process of its own, so that its flood does not delay the light tenants' client.
   The three phases run in turn twice (``fair_rounds``), each phase's answers pooled over its turns.

The service's CPU time over the overload and over each fairness phase is reported as a share of one CPU.

Each of these runs against the service itself and against the shipped HAProxy in front of it (``--fronts``:
deploy/haproxy/haproxy.cfg with loopback binds, ``haproxy`` on the PATH), ``--runs`` times each (every run
measures its own capacity).

The client is raw asyncio HTTP/1.1 on kept-alive connections with prebuilt requests (a raw ``image/jpeg`` body
of examples/cat.jpg), so that it takes little of the CPU it shares with the server. Results go to
``benchmarks/results/overload/overload-<date>.json`` (with ``os.getloadavg()`` before and after) and a PNG when
matplotlib is installed.

    .venv/bin/python benchmarks/overload.py                 # 3 runs per front, about 21 minutes on 2 cores
    .venv/bin/python benchmarks/overload.py --runs 1        # one run per front, about 7 minutes
    .venv/bin/python benchmarks/overload.py --smoke         # a few seconds per phase, one run
    .venv/bin/python benchmarks/overload.py --service-cpus 1  # the service on CPU 1, everything else on the rest
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from plotting import pyplot, save

logger = logging.getLogger("overload")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "overload"
DATE = time.strftime("%Y-%m-%d", time.gmtime())
TENANT_HEADER = "X-Tenant"
ANSWER_GRACE = 5.0  # seconds past the deadline a client waits for an answer before it counts none
CONNECTIONS = 192  # kept-alive connections at most, as a proxy's maxconn: the service's active requests and more
IDLE_SECONDS = 4.0  # a connection idle this long is not reused (the service's keep-alive timeout is 5 s)


@dataclass
class Outcome:
    """One request: its tenant, when it was due, and how and when it was answered."""

    tenant: str
    due: float  # perf_counter
    sent: float | None = None  # when its bytes were written (a connection was free)
    done: float | None = None
    status: int | None = None  # None: no answer (transport error or none within the grace)
    retry_after: bool = False
    error: str | None = None


def _request(body: bytes, tenant: str | None, due_wall: float) -> bytes:
    extra = f"{TENANT_HEADER}: {tenant}\r\n" if tenant else ""
    return (f"POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
            f"X-Request-Start: t={int(due_wall * 1e6)}\r\n{extra}\r\n").encode() + body


class Connections:
    """At most ``limit`` kept-alive connections to the server, opened as needed and reused once free; requests
    wait for one in turn, as behind a proxy with ``maxconn`` (their wait counts: X-Request-Start is their due
    time)."""

    def __init__(self, port: int, limit: int = CONNECTIONS) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # with when it was freed
        self.opened = 0
        self.free = asyncio.Semaphore(limit)

    async def exchange(self, request: bytes, outcome: Outcome, timeout: float) -> None:
        async with self.free:
            await self._exchange(request, outcome, timeout)

    async def _exchange(self, request: bytes, outcome: Outcome, timeout: float) -> None:
        while self.idle and time.perf_counter() - self.idle[0][2] > IDLE_SECONDS:
            self.idle.pop(0)[1].close()  # the server closes connections idle for its keep-alive timeout
        if self.idle:
            reader, writer, _ = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.opened += 1
        keep = False
        try:
            outcome.sent = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            outcome.done = time.perf_counter()
            outcome.status = int(head[9:12])
            length, keep = 0, True
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"retry-after":
                    outcome.retry_after = True
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep = False
            await asyncio.wait_for(reader.readexactly(length), timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError) as error:
            outcome.status, outcome.error = None, type(error).__name__
            keep = False
        if keep:
            self.idle.append((reader, writer, time.perf_counter()))
        else:
            writer.close()

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def _send(connections: Connections, body: bytes, outcome: Outcome, deadline: float,
                outcomes: list[Outcome]) -> None:
    due_wall = time.time() - (time.perf_counter() - outcome.due)
    await connections.exchange(_request(body, outcome.tenant or None, due_wall), outcome, deadline + ANSWER_GRACE)
    outcomes.append(outcome)


async def closed_loop(port: int, body: bytes, *, concurrency: int, seconds: float, deadline: float
                      ) -> list[Outcome]:
    connections, outcomes = Connections(port), []
    stop = time.perf_counter() + seconds

    async def client() -> None:
        while (now := time.perf_counter()) < stop:
            await _send(connections, body, Outcome("", now), deadline, outcomes)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    connections.close()
    return outcomes


async def open_loop(port: int, body: bytes, rates: dict[str, float], *, seconds: float, deadline: float,
                    seed: int = 0, start: float | None = None) -> list[Outcome]:
    """Poisson arrivals per tenant (``rates``: tenant -> requests per second; '' sends no tenant header), from
    ``start`` (a perf_counter time; default now)."""
    generator = random.Random(seed)
    start = time.perf_counter() if start is None else start
    arrivals = sorted((start + at, tenant) for tenant, rate in rates.items() for at in _poisson(generator, rate,
                                                                                              seconds))
    connections, outcomes, tasks = Connections(port), [], set()
    for due, tenant in arrivals:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_send(connections, body, Outcome(tenant, due), deadline, outcomes))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    connections.close()
    return outcomes


def _poisson(generator: random.Random, rate: float, seconds: float) -> Iterator[float]:
    at = generator.expovariate(rate)
    while at < seconds:
        yield at
        at += generator.expovariate(rate)


def summarise(outcomes: list[Outcome], seconds: float, deadline: float) -> dict[str, Any]:
    statuses = Counter("none" if o.status is None else str(o.status) for o in outcomes)
    ok = [o.done - o.due for o in outcomes if o.status == 200 and o.done is not None]
    on_time = [latency for latency in ok if latency <= deadline]
    refused = [o for o in outcomes if o.status == 429]
    milliseconds = np.array(ok) * 1e3
    lags = [1e3 * (o.sent - o.due) for o in outcomes if o.sent is not None]

    def percentile(q: float) -> float | None:
        return round(float(np.percentile(milliseconds, q)), 1) if len(milliseconds) else None

    return {
        "sent": len(outcomes), "answered": dict(sorted(statuses.items())),
        "unanswered": statuses.get("none", 0), "errors": dict(Counter(o.error for o in outcomes if o.error)),
        "429_without_retry_after": sum(not o.retry_after for o in refused),
        "ok_per_s": round(len(ok) / seconds, 1), "late_200": len(ok) - len(on_time),
        "goodput_per_s": round(len(on_time) / seconds, 1),
        "latency_200_ms": {"p50": percentile(50), "p90": percentile(90), "p99": percentile(99)},
        # How late the load generator wrote requests (waiting for a connection, or its own CPU): a proxy's queue.
        "send_lag_ms": {f"p{q}": round(float(np.percentile(lags, q)), 1) if lags else None for q in (50, 99)},
    }


def _metric_sum(url: str, name: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            values[key[len(name):] or "total"] = float(value)
    return values


def served_commit() -> str | None:
    """The commit of the code the services started from here run: that of the checkout their ``service`` package
    is imported from, which ``PYTHONPATH`` may point at (another worktree than this script's, for an A/B run)."""
    where = subprocess.run([sys.executable, "-c", "import os, service; print(os.path.dirname(service.__file__))"],
                           cwd=Path(sys.executable).parent, capture_output=True, text=True)  # as the entry script
    for folder in (where.stdout.strip(), str(REPO)):  # the checkout's own where the package is not in one
        if folder:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True,
                                    text=True)
            if commit.returncode == 0 and commit.stdout.strip():
                return commit.stdout.strip()
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, seconds: float, failure: str) -> None:
    """Until ``url``/readyz answers 200; ``failure`` if ``process`` exits or ``seconds`` pass first."""
    until = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > until:
            raise RuntimeError(failure)
        time.sleep(0.2)


SERVICE_CPUS: set[int] = set()  # --service-cpus: the CPUs the service runs on, the others run everything else
SERVICE_PIDS: dict[str, int] = {}  # URL -> process id of each service started by service(), while it runs


def add_service_cpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service-cpus", type=lambda text: {int(cpu) for cpu in text.split(",")},
                        help="CPUs for the service alone, e.g. '1': the load generator and HAProxy run on the others, "
                             "so that the client's work does not come out of the server's (as with a client on "
                             "another machine); by default all share every CPU")


def pin_service(parser: argparse.ArgumentParser, cpus: set[int] | None) -> None:
    """Services started from here run on ``cpus`` (--service-cpus), this process (the load generator, and HAProxy
    started from here) on the others; nothing is pinned without ``cpus``."""
    if not cpus:
        return
    others = set(os.sched_getaffinity(0)) - cpus
    if not others or not cpus <= set(os.sched_getaffinity(0)):
        parser.error(f"--service-cpus must leave CPUs for the client; this process may use "
                     f"{sorted(os.sched_getaffinity(0))}")
    SERVICE_CPUS.update(cpus)
    os.sched_setaffinity(0, others)


@contextmanager
def service(*options: str, log: Path) -> Iterator[str]:
    port = free_port()
    serve = Path(sys.executable).with_name("robustnorm-serve")
    command = [str(serve), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *options]
    # One intra-op thread: the event loop, the decoding threads and the load generator need the other core.
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    pin = (lambda: os.sched_setaffinity(0, SERVICE_CPUS)) if SERVICE_CPUS else None
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=environment,
                                   preexec_fn=pin)
    url = f"http://127.0.0.1:{port}"
    SERVICE_PIDS[url] = process.pid
    try:
        wait_ready(url, process, 180, f"the service did not become ready; see {log}")
        yield url
    finally:
        SERVICE_PIDS.pop(url, None)
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


HAPROXY_CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"


def loopback_haproxy_config(replicas: list[int], port: int, stats_port: int) -> str:
    """The shipped haproxy.cfg with loopback binds and ``replicas`` (ports on 127.0.0.1) as the servers of each
    backend in place of the DNS templates; everything else (timeouts, queue and overload limits, tenant quota)
    as shipped."""
    text = HAPROXY_CONFIG.read_text()
    servers = "\n".join(f"    server replica{i} 127.0.0.1:{replica}" for i, replica in enumerate(replicas, 1))
    text, templates = re.subn(r"^\s*server-template .*$", servers, text, flags=re.M)
    text, binds = re.subn(r"^(\s*)bind :8080$", rf"\g<1>bind 127.0.0.1:{port}", text, flags=re.M)
    text, stats = re.subn(r"^(\s*)bind :8405$", rf"\g<1>bind 127.0.0.1:{stats_port}", text, flags=re.M)
    if (templates, binds, stats) != (2, 1, 1):
        raise RuntimeError(f"{HAPROXY_CONFIG} changed shape: its server templates and binds were not found")
    return text


@dataclass
class Proxy:
    """A running HAProxy: where to send requests, and its process (for its memory)."""

    url: str
    pid: int


@contextmanager
def haproxy(service_url: str, *, tenant_rate: float | None, log: Path) -> Iterator[Proxy]:
    """HAProxy (``haproxy`` on the PATH) with the shipped configuration in front of the service at
    ``service_url``; ``tenant_rate`` sets ROBUSTNORM_TENANT_RATE (the per-tenant quota, requests per second)."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("measuring through HAProxy needs haproxy on the PATH (Debian: apt-get install haproxy)")
    port, stats_port = free_port(), free_port()
    config = log.with_suffix(".cfg")
    config.write_text(loopback_haproxy_config([int(service_url.rsplit(":", 1)[1])], port, stats_port))
    environment = dict(os.environ)
    environment.pop("ROBUSTNORM_TENANT_RATE", None)
    if tenant_rate is not None:
        environment["ROBUSTNORM_TENANT_RATE"] = str(max(1, round(tenant_rate)))
    with log.open("w") as output:
        process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=output, stderr=subprocess.STDOUT,
                                   env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, 30, f"HAProxy did not pass requests through; see {log}")
        yield Proxy(url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Plan:
    concurrency: tuple[int, ...] = (16, 32, 64)
    factor: float = 3.0
    deadline: float = 1.0
    warmup: float = 3.0
    capacity_seconds: float = 10.0  # per concurrency
    overload_seconds: float = 45.0
    fair_seconds: float = 25.0  # per phase and round
    fair_rounds: int = 2  # the fairness phases in turn this many times, each phase's answers pooled over them
    light_tenants: int = 2
    light_share: float = 0.1  # of capacity, per light tenant
    heavy_factor: float = 10.0  # times the heavy tenant's fair share of the capacity
    runs: int = 1  # the whole measurement (capacity, overload, fairness) this many times per front
    isolation: str | None = None  # the fairness server's --isolation (None: the service's default)


FRONTS = ("service", "haproxy")  # the load generator talks to the service itself, or to HAProxy in front of it


@contextmanager
def entry(front: str, *options: str, tenant_rate: float | None, workdir: Path, name: str) -> Iterator[str]:
    """The URL the load generator talks to: a fresh service, alone or behind the shipped HAProxy; ``tenant_rate``
    is the per-tenant quota, the service's own (``--tenant-rate``) when alone, else the proxy's."""
    quota = ("--tenant-rate", str(max(1, round(tenant_rate)))) if tenant_rate and front == "service" else ()
    with service(*options, *quota, log=workdir / f"{name}.log") as url:
        if front == "service":
            yield url
        else:
            with haproxy(url, tenant_rate=tenant_rate, log=workdir / f"{name}-haproxy.log") as proxy:
                yield proxy.url


def run(plan: Plan, workdir: Path, fronts: tuple[str, ...] = FRONTS) -> dict[str, Any]:
    body = (REPO / "examples" / "cat.jpg").read_bytes()
    common = ["--request-deadline", str(plan.deadline), "--trust-request-start"]
    haproxy_version = (subprocess.run([shutil.which("haproxy") or "haproxy", "-v"], capture_output=True,
                                      text=True).stdout.splitlines() or [None])[0] if "haproxy" in fronts else None
    report: dict[str, Any] = {"date": DATE, "plan": vars(plan), "commit": served_commit(),
                              "service": ["robustnorm-serve (bundled default model)", *common,
                                          "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "1")],
                              "haproxy": haproxy_version and f"{haproxy_version}, deploy/haproxy/haproxy.cfg "
                                                             "with loopback binds and the service as its server",
                              "client": f"raw asyncio HTTP/1.1, at most {CONNECTIONS} kept-alive connections (a "
                                        "proxy's maxconn); X-Request-Start = each request's due time (HAProxy "
                                        "replaces it with its own receive time)",
                              "image": "examples/cat.jpg (raw image/jpeg body)", "machine": {
                                  "cpus": os.cpu_count(), "python": platform.python_version(),
                                  "service_cpus": sorted(SERVICE_CPUS) or "shared with the client",
                                  "client_cpus": sorted(os.sched_getaffinity(0)),
                                  "loadavg_before": os.getloadavg()}, "fronts": {}}
    for front in fronts:
        runs = [measure(plan, front, body, common, workdir) for _ in range(plan.runs)]
        report["fronts"][front] = {"runs": runs, "median_run": median_run(runs)}
    report["machine"]["loadavg_after"] = os.getloadavg()
    return report


def closed_loops(port: int, body: bytes, concurrency: Sequence[int], seconds: float, deadline: float,
                 label: str = "service") -> dict[str, dict[str, Any]]:
    """A closed loop of each number of ``concurrency`` clients for ``seconds``, summarised; the capacity is the
    most 200s per second of these."""
    closed = {}
    for clients in concurrency:
        closed[str(clients)] = summarise(asyncio.run(closed_loop(
            port, body, concurrency=clients, seconds=seconds, deadline=deadline)), seconds, deadline)
        logger.info("%s, closed loop, %d clients: %s", label, clients, closed[str(clients)])
    return closed


def measure_capacity(plan: Plan, port: int, body: bytes, front: str) -> tuple[dict[str, dict[str, Any]], float]:
    """A warm-up, then :func:`closed_loops` at ``plan.concurrency``: the summaries and the capacity (the most 200s
    per second of them)."""
    asyncio.run(closed_loop(port, body, concurrency=max(plan.concurrency), seconds=plan.warmup,
                            deadline=plan.deadline))
    closed = closed_loops(port, body, plan.concurrency, plan.capacity_seconds, plan.deadline, front)
    return closed, max(result["ok_per_s"] for result in closed.values())


def median_run(runs: list[dict[str, Any]]) -> int:
    """Index of the run with the median goodput (as a share of its own capacity): the one the plot shows."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["overload"]["goodput_of_capacity_mean"])
    return order[(len(order) - 1) // 2]


def measure(plan: Plan, front: str, body: bytes, common: list[str], workdir: Path) -> dict[str, Any]:
    """Capacity, overload at ``plan.factor`` x capacity and fairness, with the load generator talking to
    ``front``."""
    result: dict[str, Any] = {}
    with entry(front, *common, tenant_rate=None, workdir=workdir, name=f"{front}-overload") as url:
        port = int(url.rsplit(":", 1)[1])
        closed, capacity = measure_capacity(plan, port, body, front)
        logger.info("%s: capacity %.1f answers/s", front, capacity)
        late_before = _metric_sum(url, "robustnorm_late_dropped_requests_total")
        rate = plan.factor * capacity
        used, began = service_cpu_seconds(), time.perf_counter()
        overload = summarise(asyncio.run(open_loop(port, body, {"": rate}, seconds=plan.overload_seconds,
                                                   deadline=plan.deadline)), plan.overload_seconds, plan.deadline)
        # over the open loop, from its first request to its last answer
        overload["service_cpu_share"] = round((service_cpu_seconds() - used) / (time.perf_counter() - began), 3)
        late_after = _metric_sum(url, "robustnorm_late_dropped_requests_total")
        overload["offered_per_s"] = round(rate, 1)
        overload["goodput_of_capacity"] = round(overload["goodput_per_s"] / capacity, 3)
        overload["server_late_dropped_requests"] = {k: late_after[k] - late_before.get(k, 0) for k in late_after}
        logger.info("%s, open loop at %.1f/s: %s", front, rate, overload)
        # The capacity again after the overload, so that a change of the machine's speed between the capacity and
        # the overload shows (this VM's speed drifts by 10-20% within minutes): the goodput against the mean of
        # the two is the check; against the first alone as the runs before 2026-12-08 reported it.
        closed_after, capacity_after = measure_capacity(plan, port, body, front)
        capacity_mean = (capacity + capacity_after) / 2
        overload["goodput_of_capacity_after"] = round(overload["goodput_per_s"] / capacity_after, 3)
        overload["goodput_of_capacity_mean"] = round(overload["goodput_per_s"] / capacity_mean, 3)
        logger.info("%s: capacity after the overload %.1f answers/s; goodput %.0f%% of the mean capacity", front,
                    capacity_after, 100 * overload["goodput_of_capacity_mean"])
        result["capacity"] = {"closed_loop": closed, "answers_per_s": capacity, "closed_loop_after": closed_after,
                              "answers_per_s_after": capacity_after, "answers_per_s_mean": round(capacity_mean, 1)}
        result["overload"] = overload
    result["fairness"] = fairness(plan, front, body, capacity, common, workdir)
    return result


def fairness(plan: Plan, front: str, body: bytes, capacity: float, common: list[str], workdir: Path
             ) -> dict[str, Any]:
    """Light tenants alone, then beside a heavy tenant sending its share, then ``heavy_factor`` times its share
    (the per-tenant quota set to that share: the service's own when alone, the proxy's behind HAProxy). What
    the flood costs the light tenants is the third phase against the second: the same tenants admitted at the
    same rates, the excess refused.

    The three phases run in turn ``plan.fair_rounds`` times, and each phase's answers are pooled over its rounds:
    a p99 of one short phase moved by a quarter between identical phases on this machine, and its speed drifts
    over minutes, which turns hit alike. The service's CPU time over each phase is reported as a share of one
    CPU (``service_cpu_share``): what the flood's refusals cost the one core the answers need.

    The heavy tenant's client is a process of its own (:func:`tenant_process`), as another tenant's client is
    another machine: its flood of requests and refusals must not hold up the light tenants' event loop, whose
    latencies are measured, though both still share the client's CPUs."""
    light = {f"light{i}": plan.light_share * capacity for i in range(plan.light_tenants)}
    share = capacity / (plan.light_tenants + 1)
    heavy = {"heavy": plan.heavy_factor * share}
    quota = share
    phases = (("light_alone", {}), ("with_heavy_at_share", {"heavy": share}), ("with_heavy", heavy))
    result: dict[str, Any] = {"light_per_s": round(plan.light_share * capacity, 1),
                              "heavy_per_s": round(heavy["heavy"], 1),
                              "tenant_rate_quota": quota and max(1, round(quota)),
                              "clients": "the light tenants in one process, the heavy tenant in another",
                              "rounds": plan.fair_rounds, "seconds_per_phase_and_round": plan.fair_seconds}
    pooled: dict[str, list[Outcome]] = {name: [] for name, _ in phases}
    cpu: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in phases}  # CPU seconds, wall seconds
    per_round: list[dict[str, Any]] = []
    isolation = ("--isolation", plan.isolation) if plan.isolation else ()
    with entry(front, *common, "--batch-key", "header", *isolation, tenant_rate=quota, workdir=workdir,
               name=f"{front}-fair") as url:
        port = int(url.rsplit(":", 1)[1])
        asyncio.run(closed_loop(port, body, concurrency=4, seconds=plan.warmup, deadline=plan.deadline))
        for _ in range(plan.fair_rounds):
            this_round: dict[str, Any] = {}
            for name, heavy_rates in phases:
                start = time.perf_counter() + 0.5  # both clients begin together, the child started by then
                child = tenant_process(port, body, heavy_rates, plan, start) if heavy_rates else None
                used, began = service_cpu_seconds(), time.perf_counter()
                outcomes = asyncio.run(open_loop(port, body, light, seconds=plan.fair_seconds,
                                                 deadline=plan.deadline, seed=1, start=start))
                if child is not None:
                    outcomes += child()
                cpu[name][0] += service_cpu_seconds() - used
                cpu[name][1] += time.perf_counter() - max(began, start)
                pooled[name] += outcomes
                this_round[name] = {tenant: summarise([o for o in outcomes if o.tenant == tenant], plan.fair_seconds,
                                                      plan.deadline)["latency_200_ms"]["p99"]
                                    for tenant in (*light, *heavy_rates)}
                logger.info("%s, %s: p99 %s", front, name, json.dumps(this_round[name]))
            per_round.append(this_round)
    seconds = plan.fair_seconds * plan.fair_rounds
    for name, heavy_rates in phases:
        result[name] = {tenant: summarise([o for o in pooled[name] if o.tenant == tenant], seconds, plan.deadline)
                        for tenant in (*light, *heavy_rates)}
    result["light_tenants_p99_ms"] = {name: summarise([o for o in pooled[name] if o.tenant in light], seconds,
                                                      plan.deadline)["latency_200_ms"]["p99"] for name, _ in phases}
    result["p99_ms_per_round"] = per_round
    # over the phases' open loops, each from its start to its last answer (the CPU time read a little before)
    result["service_cpu_share"] = {name: round(used / wall, 3) for name, (used, wall) in cpu.items()}
    logger.info("%s, fairness: %s", front, json.dumps({key: result[key] for key in (
        "light_tenants_p99_ms", "service_cpu_share")}))
    return result


def service_cpu_seconds() -> float:
    """CPU seconds the one service started from here (:func:`service`) has used (every thread), or 0 with none."""
    if len(SERVICE_PIDS) != 1:
        return 0.0
    (pid,) = SERVICE_PIDS.values()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def tenant_process(port: int, body: bytes, rates: dict[str, float], plan: Plan, start: float
                   ) -> Callable[[], list[Outcome]]:
    """Start the open loop of ``rates`` in a child process from ``start`` (perf_counter, shared by a forked
    child); the returned call waits for it and gives its outcomes."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)

    def child() -> None:
        send.send(asyncio.run(open_loop(port, body, rates, seconds=plan.fair_seconds, deadline=plan.deadline,
                                        seed=2, start=start)))
        send.close()

    process = context.Process(target=child, daemon=True)
    process.start()
    send.close()

    def result() -> list[Outcome]:
        outcomes = receive.recv()
        process.join(timeout=30)
        return outcomes
    return result


def plot(report: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fronts = report["fronts"]
    figure, axes = plt.subplots(len(fronts), 2, figsize=(11, 4 * len(fronts)), squeeze=False)
    seconds, factor = report["plan"]["overload_seconds"], report["plan"]["factor"]
    for (left, right), (front, measured) in zip(axes, fronts.items()):
        result = measured["runs"][measured["median_run"]]
        capacity, overload = result["capacity"]["answers_per_s"], result["overload"]
        after = result["capacity"].get("answers_per_s_after", capacity)
        labels = ["capacity\nbefore", "capacity\nafter", f"offered\n({factor:g}x)", "goodput", "429/s", "503/s",
                  "504/s"]
        values = [capacity, after, overload["offered_per_s"], overload["goodput_per_s"],
                  *(overload["answered"].get(code, 0) / seconds for code in ("429", "503", "504"))]
        left.bar(labels, values, color=["grey", "grey", "lightgrey", "tab:green", "tab:orange", "gold", "tab:red"])
        left.axhline(0.9 * (capacity + after) / 2, color="black", linestyle="--", linewidth=1,
                     label="90% of the mean capacity")
        left.set_ylabel("requests per second")
        left.set_title(f"{front}: open loop at {factor:g}x capacity (deadline {report['plan']['deadline']:g} s)")
        left.legend()
        fair = result["fairness"]
        tenants = list(fair["with_heavy"])
        phases = (("light_alone", "tab:blue"), ("with_heavy_at_share", "tab:cyan"), ("with_heavy", "tab:purple"))
        for offset, (name, colour) in enumerate(phases):
            p99 = [fair.get(name, {}).get(t, {}).get("latency_200_ms", {}).get("p99") or 0 for t in tenants]
            right.bar([i + 0.27 * offset for i in range(len(tenants))], p99, width=0.27, color=colour,
                      label=name.replace("_", " ").replace("with heavy", "beside heavy"))
        right.set_xticks([i + 0.27 for i in range(len(tenants))], tenants)
        right.set_ylabel("p99 latency of 200s (ms)")
        right.set_title(f"{front}: light tenants beside a heavy one")
        right.legend()
    save(figure, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds per phase (while developing)")
    parser.add_argument("--factor", type=float, default=3.0, help="open-loop load as a multiple of capacity")
    parser.add_argument("--deadline", type=float, default=1.0, help="the service's request deadline (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32, 64],
                        help="closed-loop clients for the capacity (the best of these)")
    parser.add_argument("--fronts", nargs="+", choices=FRONTS, default=list(FRONTS),
                        help="what the load generator talks to: the service itself, HAProxy in front of it, or both")
    parser.add_argument("--runs", type=int, default=3,
                        help="repeat the whole measurement per front (runs vary on a shared machine; the JSON keeps "
                             "every run and marks the median's)")
    parser.add_argument("--isolation", choices=("separate", "grouped"),
                        help="the fairness server's tenant isolation (default: the service's own default)")
    add_service_cpus(parser)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    args = parser.parse_args(argv)
    pin_service(parser, args.service_cpus)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    plan = Plan(concurrency=tuple(args.concurrency), factor=args.factor, deadline=args.deadline, runs=args.runs,
                isolation=args.isolation)
    if args.smoke:
        plan = Plan(concurrency=tuple(args.concurrency), factor=args.factor, deadline=args.deadline, warmup=1.0,
                    capacity_seconds=3.0, overload_seconds=6.0, fair_seconds=5.0, fair_rounds=1, runs=1,
                    isolation=args.isolation)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"overload-{DATE}{'-smoke' if args.smoke else ''}"
    with tempfile.TemporaryDirectory(prefix="overload-") as logs:  # the logs, kept only while running
        report = run(plan, Path(logs), tuple(args.fronts))
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    if plot(report, args.out / f"{name}.png"):
        logger.info("wrote %s", args.out / f"{name}.png")
    logger.info("wrote %s", args.out / f"{name}.json")
    for front, measured in report["fronts"].items():
        for index, result in enumerate(measured["runs"]):
            overload, fair = result["overload"], result["fairness"]
            light = {tenant: tuple(fair[phase][tenant]["latency_200_ms"]["p99"]
                                   for phase in ("light_alone", "with_heavy_at_share", "with_heavy"))
                     for tenant in fair["light_alone"]}
            light["both"] = tuple(fair["light_tenants_p99_ms"].values())
            print(f"{front}, run {index + 1}: capacity {result['capacity']['answers_per_s']:.1f}/s before, "
                  f"{result['capacity']['answers_per_s_after']:.1f}/s after; at {plan.factor:g}x: goodput "
                  f"{overload['goodput_per_s']:.1f}/s ({100 * overload['goodput_of_capacity_mean']:.0f}% of the mean "
                  f"capacity, {100 * overload['goodput_of_capacity']:.0f}% of that before), answered "
                  f"{overload['answered']}, "
                  f"late 200s {overload['late_200']}, p50/p90/p99 "
                  f"{overload['latency_200_ms']}; light tenants' p99 alone, beside the heavy one at its share, "
                  f"beside it at {plan.heavy_factor:g}x: {light}; the service's CPU share in those phases "
                  f"{tuple(fair['service_cpu_share'].values())}, at {plan.factor:g}x {overload['service_cpu_share']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
