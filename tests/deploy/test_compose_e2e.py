"""End to end on a Docker engine: the shipped docker-compose.yml, its images built and run for real.

``bash deploy/e2e/compose_up.sh test`` runs this module (marked ``docker``). It is skipped unless
``ROBUSTNORM_DOCKER_E2E=1``, so the main suite never runs it; when the engine cannot start or the images cannot
be built it skips with the reason, and fails instead under CI (``$CI`` set).

The stack is the shipped ``docker-compose.yml`` plus ``deploy/e2e/compose.e2e.yml``: the service image built
from the shipped Dockerfile (a local base image and torch index passed as build arguments), HAProxy 2.6,
Prometheus 2.42 and locust 2.47.0 as local stand-ins with the shipped configuration files, Grafana left out
(its server cannot be had here; every dashboard query runs against this Prometheus instead). The test's copy of
``deploy/prometheus`` differs from the shipped one only in its intervals (5 s scrapes and evaluations) and the
rules' ``for:`` (10 s), so that an alert can fire within the test. Published ports are bound to 127.0.0.1 on
free ports; the replicas, which publish none, are reached on the stack's own Docker network.

In order: ``docker compose up`` (one replica, as users start it) and its health check turning healthy;
predictions through HAProxy; ``--scale service=3`` with requests reaching every replica and Prometheus scraping
every replica; noise traffic firing ``RobustnormBatchDriftHigh``; a headless locust run through the ``load``
profile; every dashboard query returning data; and last ``docker compose stop service``, then ``docker compose
stop``, under load: every accepted request must be answered.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from deploy_support import (
    DASHBOARD_FILE,
    PROMETHEUS_DIR,
    REPO_ROOT,
    PrometheusAPI,
    dashboard_queries,
    free_port,
    noise_png,
    numbers,
    skip_or_fail,
    wait_until,
    write_rules_shortened,
)
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

if not os.environ.get("ROBUSTNORM_DOCKER_E2E"):
    pytest.skip("the compose end-to-end run builds images and starts containers on a Docker engine: run "
                "`bash deploy/e2e/compose_up.sh test` (or set ROBUSTNORM_DOCKER_E2E=1)", allow_module_level=True)

SCRIPT = REPO_ROOT / "deploy" / "e2e" / "compose_up.sh"
SERVICE_IMAGE = "robustnorm:0.1.0-cpu"
REPLICAS = 3
TEST_INTERVAL = "5s"  # scrape and evaluation interval of the test's Prometheus (shipped: 15s)
TEST_FOR = "10s"  # every rule's `for:` in the test's copy of the rules
RATE_INTERVAL = "2m"  # Grafana's $__rate_interval (at least 4 scrapes of the shipped 15 s; wider ranges give more)
NOISE_REQUESTS = 48  # of 32 noise images each, per round
LOCUST_USERS = 10
LOCUST_SECONDS = 20
DRAIN_CLIENTS = 12
DRAIN_IMAGES = 16  # per request


# ------------------------------------------------------------------------------------------ the stack


@dataclass
class Stack:
    env: dict[str, str]  # compose's environment: ports, the Prometheus folder, LOAD_IMAGES
    lb: str  # http://127.0.0.1:PORT
    prometheus: PrometheusAPI
    workdir: Path

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``docker compose ARGS`` with the run's project name and files (compose_up.sh's), logged."""
        result = subprocess.run(["bash", str(SCRIPT), "compose", *args], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=timeout, env={**os.environ, **self.env}, check=False)
        logger.info("docker compose %s -> %d\n%s", " ".join(args), result.returncode, result.stderr[-2000:])
        if check:
            assert result.returncode == 0, f"docker compose {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "--quiet", service).stdout.split()

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "40", timeout=60, check=False).stdout


def docker(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def inspect(container: str) -> dict[str, Any]:
    return json.loads(docker("inspect", container))[0]


def address(container: str) -> str:
    """The container's address on the stack's network (the host reaches it over Docker's bridge)."""
    (network,) = inspect(container)["NetworkSettings"]["Networks"].values()
    return network["IPAddress"]


def _readable(path: Path) -> None:
    """Containers run as unprivileged users: make a folder of the test's and its files readable to them."""
    for item in [path, *path.rglob("*")]:
        item.chmod(item.stat().st_mode | stat.S_IROTH | stat.S_IRGRP | (stat.S_IXOTH | stat.S_IXGRP
                                                                       if item.is_dir() else 0))


def _test_prometheus_dir(workdir: Path) -> Path:
    """deploy/prometheus with 5 s intervals and every rule's `for:` shortened; discovery and jobs unchanged."""
    target = workdir / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, target)
    config = yaml.safe_load((target / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=TEST_INTERVAL, scrape_timeout="4s", evaluation_interval=TEST_INTERVAL)
    (target / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_rules_shortened(target / "rules", TEST_FOR)
    _readable(target)
    return target


def _prepare() -> None:
    """Engine, Compose, base image and images (compose_up.sh prepare): skip with the reason, or fail under CI."""
    if os.environ.get("ROBUSTNORM_E2E_PREPARED"):
        if subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode != 0:
            skip_or_fail("compose_up.sh prepared the run, but the Docker engine no longer answers")
        return
    started = time.monotonic()
    try:
        result = subprocess.run(["bash", str(SCRIPT), "prepare"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=1500, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        skip_or_fail(f"compose_up.sh prepare did not finish: {error}")
    if result.returncode != 0:
        skip_or_fail("the Docker engine could not start or the images could not be built "
                     f"(compose_up.sh prepare exited {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    steps = [line for line in result.stderr.splitlines() if line.startswith("[compose_up")]
    logger.info("prepared in %.0f s:\n%s", time.monotonic() - started, "\n".join(steps))


@pytest.fixture(scope="module")
def stack(cifar10: Path) -> Iterator[Stack]:
    _prepare()
    workdir = Path(tempfile.mkdtemp(prefix="robustnorm-compose-e2e-"))
    _readable(workdir)
    lb_port, prometheus_port = free_port(), free_port()
    env = {
        "ROBUSTNORM_HTTP_PORT": str(lb_port), "PROMETHEUS_PORT": str(prometheus_port),
        "LOCUST_PORT": str(free_port()), "ROBUSTNORM_E2E_PROMETHEUS_DIR": str(_test_prometheus_dir(workdir)),
        "LOAD_IMAGES": str(cifar10 / "test.tar.gz"),
        # The drift alert is driven under frozen statistics, where every batch has a calibrated score, and the
        # score is put in each answer (inline) for the test to read; under the cards' auto policy, batches that
        # run stream statistics carry no batch score (docs/drift.md).
        "ROBUSTNORM_POLICY": "frozen", "ROBUSTNORM_DRIFT_METRICS": "inline",
    }
    stack = Stack(env=env, lb=f"http://127.0.0.1:{lb_port}",
                  prometheus=PrometheusAPI(f"http://127.0.0.1:{prometheus_port}"), workdir=workdir)
    stack.compose("--profile", "load", "down", "--volumes", "--remove-orphans", timeout=120)  # an earlier run's
    try:
        stack.compose("up", "--detach", "--no-build", timeout=300)
        yield stack
    finally:
        logger.info("logs at the end:\n%s", stack.logs())
        stack.compose("--profile", "load", "down", "--volumes", "--remove-orphans", "--timeout", "30",
                      timeout=180, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------ traffic helpers


def _cifar_sample(archive: Path, count: int) -> list[bytes]:
    """``count`` test images spread over every class (the archive is ordered by class)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and PurePosixPath(m.name).suffix == ".jpg"]
        step = max(1, len(members) // count)
        return [tar.extractfile(member).read() for member in members[::step][:count]]  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def images(cifar10: Path) -> list[bytes]:
    return _cifar_sample(cifar10 / "test.tar.gz", 100)


def _multipart(images: list[bytes], media_type: str = "image/jpeg") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.img", data, media_type)) for i, data in enumerate(images)]


def _replica_of(prediction: dict[str, Any]) -> str:
    """Batch ids are "<process token>-<n>": the token names the replica that ran the batch."""
    return prediction["batch"]["id"].rsplit("-", 1)[0]


def _replica_counters(container: str) -> dict[str, float]:
    """A replica's own /metrics: its /predict answers by status code."""
    text = httpx.get(f"http://{address(container)}:8000/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "robustnorm_requests_total" and sample.labels.get("route") == "/predict":
                counts[sample.labels["code"]] = counts.get(sample.labels["code"], 0) + sample.value
    return counts


# ------------------------------------------------------------------------------------------ up, one replica


def test_service_turns_healthy_through_its_image_healthcheck(stack: Stack) -> None:
    """The image's HEALTHCHECK (/readyz) goes from starting to healthy; it reports failure when /readyz fails."""
    (container,) = stack.containers("service")
    started = time.monotonic()
    seen: list[str] = []

    def healthy() -> bool:
        status = inspect(container)["State"]["Health"]["Status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        return status == "healthy"

    wait_until(healthy, 180, f"the service container healthy (statuses so far: {seen})", interval=0.5)
    logger.info("health statuses %s; healthy %.0f s after the test started waiting", seen, time.monotonic() - started)
    assert "unhealthy" not in seen
    state = inspect(container)["State"]["Health"]
    assert state["Log"] and state["Log"][-1]["ExitCode"] == 0
    # the same check against a port nothing answers on must fail: the check can tell
    failing = subprocess.run(["docker", "exec", "--env", "ROBUSTNORM_PORT=1", container, "python",
                              "/usr/local/bin/robustnorm-healthcheck"], capture_output=True, timeout=30, check=False)
    assert failing.returncode == 1
    wait_until(lambda: httpx.get(f"{stack.lb}/readyz", timeout=5).status_code == 200, 60, "HAProxy routing to it")


def test_service_image_runs_as_non_root(stack: Stack) -> None:
    (container,) = stack.containers("service")
    details = inspect(container)
    assert details["Config"]["User"] == "10001:10001"
    assert details["Config"]["Image"] == SERVICE_IMAGE
    uid_line = next(line for line in docker("exec", container, "cat", "/proc/1/status").splitlines()
                    if line.startswith("Uid:"))
    assert set(uid_line.split()[1:]) == {"10001"}, uid_line  # real, effective, saved and file-system uid
    assert docker("exec", container, "id", "-un").strip() == "robustnorm"


def test_predictions_through_haproxy(stack: Stack, images: list[bytes]) -> None:
    with httpx.Client(base_url=stack.lb, timeout=60) as client:
        model = client.get("/v1/model").json()
        raw = client.post("/predict", content=images[0], headers={"Content-Type": "image/jpeg"})
        multipart = client.post("/predict", files=_multipart(images[1:9]))
        encoded = client.post("/predict", json={"images": [base64.b64encode(image).decode() for image in images[9:12]]})
        rejected = client.post("/predict", content=b"not an image", headers={"Content-Type": "image/jpeg"})
    for response, count in ((raw, 1), (multipart, 8), (encoded, 3)):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == model["name"] and len(body["predictions"]) == count
        for prediction in body["predictions"]:
            assert prediction["label"] == model["labels"][prediction["index"]]
            assert prediction["batch"]["statistics"] in ("batch", "blend", "frozen")
    assert rejected.status_code == 400 and rejected.json()["error"]["code"]


# ------------------------------------------------------------------------------------------ scale-out


@pytest.fixture(scope="module")
def scaled(stack: Stack) -> list[str]:
    """``docker compose up --scale service=3`` on the running stack; every replica healthy."""
    stack.compose("up", "--detach", "--no-build", "--no-recreate", "--scale", f"service={REPLICAS}")
    containers = stack.containers("service")
    assert len(containers) == REPLICAS

    def all_healthy() -> bool:
        return all(inspect(c)["State"]["Health"]["Status"] == "healthy" for c in containers)

    wait_until(all_healthy, 180, f"{REPLICAS} healthy replicas", interval=1)
    return containers


def test_requests_through_haproxy_reach_every_replica(stack: Stack, scaled: list[str], images: list[bytes]) -> None:
    before = {container: _replica_counters(container).get("200", 0) for container in scaled}

    def every_replica_serving() -> set[str] | None:  # HAProxy re-resolves `service` every few seconds
        with httpx.Client(base_url=stack.lb, timeout=60) as client, ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(lambda image: client.post("/predict", content=image,
                                                                headers={"Content-Type": "image/jpeg"}),
                                      images[20:50]))
        assert {response.status_code for response in responses} == {200}
        seen = {_replica_of(r.json()["predictions"][0]) for r in responses}
        return seen if len(seen) == REPLICAS else None

    seen = wait_until(every_replica_serving, 90, f"answers from {REPLICAS} replicas", interval=2)
    after = {container: _replica_counters(container).get("200", 0) for container in scaled}
    assert len(seen) == REPLICAS
    assert all(after[c] > before[c] for c in scaled), f"/predict answers per replica: {before} -> {after}"


def test_prometheus_scrapes_every_replica(stack: Stack, scaled: list[str]) -> None:
    expected = {f"{address(container)}:8000" for container in scaled}

    def replicas_up() -> set[str] | None:
        targets = [t for t in stack.prometheus.targets() if t["labels"]["job"] == "robustnorm"]
        found = {t["labels"]["instance"] for t in targets if t["health"] == "up"}
        return found if found == expected and len(targets) == REPLICAS else None

    wait_until(replicas_up, 90, f"Prometheus scraping {sorted(expected)}", interval=2)
    lb = [t for t in stack.prometheus.targets() if t["labels"]["job"] == "loadbalancer"]
    assert lb and lb[0]["health"] == "up", lb

    def model_info() -> set[str] | None:
        found = {labels["instance"] for labels in stack.prometheus.series('robustnorm_model_info{job="robustnorm"}',
                                                                         lookback=60)}
        return found if found == expected else None

    wait_until(model_info, 30, "robustnorm_model_info from every replica")
    (up,) = numbers(stack.prometheus.query('sum(up{job="robustnorm"})'))
    assert up == REPLICAS


# ------------------------------------------------------------------------------------------ alerts


def test_noise_traffic_fires_the_batch_drift_alert(stack: Stack, scaled: list[str]) -> None:
    """A stream of noise images (a shifted input) raises the calibrated batch score above the rule's median
    of 3, and RobustnormBatchDriftHigh fires (its `for:` shortened to 10 s) for the replicas that served it."""

    def firing() -> list[dict[str, Any]]:
        return stack.prometheus.query('ALERTS{alertname="RobustnormBatchDriftHigh", alertstate="firing"}')

    assert not firing(), "the drift alert fired on clean traffic"
    scores: list[float] = []
    alerts: list[dict[str, Any]] = []
    with httpx.Client(base_url=stack.lb, timeout=120) as client:
        for round_ in range(3):  # each round outnumbers the clean batches so far on every replica
            def send(request: int, round_: int = round_) -> None:
                noise = [noise_png(round_ * 10_000 + request * 100 + i) for i in range(32)]
                response = client.post("/predict", files=_multipart(noise, "image/png"))
                assert response.status_code == 200, response.text
                scores.append(response.json()["predictions"][0]["batch"]["drift_score"])

            with ThreadPoolExecutor(max_workers=3) as pool:
                list(pool.map(send, range(NOISE_REQUESTS)))
            try:
                alerts = wait_until(firing, 60, "RobustnormBatchDriftHigh firing", interval=2)
                break
            except AssertionError:
                logger.warning("no drift alert after noise round %d", round_ + 1)
    scores.sort()
    assert scores[len(scores) // 2] > 3, f"median noise batch score {scores[len(scores) // 2]:.2f}"
    assert alerts, "RobustnormBatchDriftHigh never fired"
    replicas = {f"{address(container)}:8000" for container in scaled}
    for alert in alerts:
        labels = alert["metric"]
        assert labels["job"] == "robustnorm" and labels["severity"] == "warning" and labels["instance"] in replicas


# ------------------------------------------------------------------------------------------ locust


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_locust_headless_through_the_load_profile(stack: Stack, scaled: list[str]) -> None:
    """The `load` profile's locust (the shipped locustfile mounted, LOAD_IMAGES the CIFAR-10 archive),
    headless against the load balancer: no failure but 429s, every request kind sent."""
    out = stack.workdir / "locust"
    out.mkdir()
    out.chmod(0o777)  # locust runs as an unprivileged user
    result = stack.compose(
        "--profile", "load", "run", "--rm", "--no-deps", "--volume", f"{out}:/mnt/out",
        "locust", "-f", "/mnt/locust/locustfile.py", "--host", "http://lb:8080", "--headless",
        "--users", str(LOCUST_USERS), "--spawn-rate", "5", "--run-time", f"{LOCUST_SECONDS}s", "--stop-timeout", "10",
        "--max-images", "500", "--csv", "/mnt/out/run", "--only-summary", timeout=LOCUST_SECONDS + 180, check=False)
    output = (result.stdout + result.stderr)[-4000:]
    assert (out / "run_stats.csv").is_file(), f"locust wrote no CSV summary:\n{output}"
    stats, failures = _read_csv(out / "run_stats.csv"), _read_csv(out / "run_failures.csv")
    total = next(row for row in stats if row["Name"] == "Aggregated")
    requests = int(total["Request Count"])
    rejected = sum(int(row["Occurrences"]) for row in failures if "429 queue full" in row["Error"])
    logger.info("locust: %d requests, %d answered 429, %.1f requests/s", requests, rejected, float(total["Requests/s"]))
    assert not [row for row in failures if "429 queue full" not in row["Error"]], failures
    assert int(total["Failure Count"]) == rejected
    assert requests >= 3 * LOCUST_USERS, f"only {requests} requests in {LOCUST_SECONDS} s"
    names = {row["Name"] for row in stats}
    assert {"/predict single", "/predict multipart", "/predict json", "/predict burst"} <= names
    assert result.returncode == 0, output


# ------------------------------------------------------------------------------------------ dashboard


def test_every_dashboard_query_returns_data(stack: Stack, scaled: list[str]) -> None:
    """Grafana's queries (every panel, every measure; all replicas), sent to the stack's Prometheus after the
    traffic above: each returns at least one number."""
    time.sleep(10)  # two scrapes after the last request
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    (instances,) = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    selector = instances["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0]
    assert {labels["instance"] for labels in stack.prometheus.series(selector, lookback=120)} == {
        f"{address(container)}:8000" for container in scaled}
    empty = []
    for title, expr in dashboard_queries(RATE_INTERVAL):
        values = numbers(stack.prometheus.query(expr))
        if not values or all(math.isnan(value) for value in values):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


# ------------------------------------------------------------------------------------------ drain on stop


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None = None  # the HTTP status, when an answer came
    closes: bool = False  # the answer said `Connection: close`
    no_server: bool = False  # HAProxy's own 503: no replica was up to forward the request to (never accepted)
    draining: bool = False  # a replica's 503 `draining`: refused, not accepted (HAProxy may drop its `close`)
    body: str = ""  # the start of an answer other than 200, for the failure message
    refused: str = ""  # the connection was never established (refused, unreachable, no route)
    lost: str = ""  # established, then reset or left without an answer


def _send(client: httpx.Client, url: str, files: list[tuple[str, tuple[str, bytes, str]]]) -> Outcome:
    """One request; ``client`` keeps no connection, so that each request opens its own (a refusal is told apart
    from a reset), and ``started`` is taken just before it, not before a client's own set-up."""
    started = time.time()
    try:
        response = client.post(url, files=files)
        return Outcome(started, time.time(), status=response.status_code,
                       closes=response.headers.get("connection", "").lower() == "close",
                       no_server=response.status_code == 503 and "No server is available" in response.text,
                       draining=response.status_code == 503 and '"code":"draining"' in response.text.replace(" ", ""),
                       body="" if response.status_code == 200 else response.text[:160])
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        return Outcome(started, time.time(), refused=f"{type(error).__name__}: {error}")
    except httpx.HTTPError as error:
        return Outcome(started, time.time(), lost=f"{type(error).__name__}: {error}")


def _sigterm_times(containers: list[str], since: float, signum: int = signal.SIGTERM) -> list[float]:
    """When the engine sent SIGTERM (or ``signum``) to each container (its `kill` events), as Unix times."""
    lines = docker("events", "--since", f"{since - 1:.3f}", "--until", f"{time.time():.3f}", "--filter", "event=kill",
                   "--format", "{{json .}}").splitlines()
    found: dict[str, float] = {}
    for event in map(json.loads, lines):
        if event["Actor"]["Attributes"].get("signal") == str(int(signum)) and event["Actor"]["ID"] in containers:
            found.setdefault(event["Actor"]["ID"], event["timeNano"] / 1e9)
    assert set(found) == set(containers), f"signal {int(signum)} seen for {sorted(found)} of {containers}"
    return list(found.values())


def test_compose_stop_drains_in_flight_requests(stack: Stack, scaled: list[str], images: list[bytes]) -> None:
    """`docker compose stop service`, then `docker compose stop`, while clients keep sending 16-image requests
    to HAProxy, each on a connection of its own. Every request gets an HTTP answer (200; a refusing 503: a
    replica's `draining`, or HAProxy's own once no replica is left) or is refused before a connection is made;
    none is reset or left unanswered. Requests in flight when the replicas got SIGTERM (the engine's `kill`
    events) are answered, some of them 200 (the replicas drain their queues). Every replica and the load
    balancer exit 0 within their grace periods, not killed."""
    (lb,) = stack.containers("lb")
    url = f"http://{address(lb)}:8080/predict"  # HAProxy itself on the stack's network, not a proxy of it
    files = _multipart(images[:DRAIN_IMAGES])
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def client_loop() -> None:
        # A client per thread: with one pool shared by the threads, a read once failed on the client's side with
        # EBADF (a descriptor closed under it locally) while HAProxy logged the request as ended normally.
        with httpx.Client(timeout=httpx.Timeout(60, connect=3),
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while not stop.is_set():
                outcomes.append(_send(client, url, files))

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(DRAIN_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(6)
        served_before = sum(o.status == 200 for o in outcomes)
        stop_started = time.time()
        stack.compose("stop", "service", timeout=120)  # the replicas drain; HAProxy keeps listening
        replicas_seconds = time.time() - stop_started
        time.sleep(3)  # HAProxy answers for the stopped replicas
        stack.compose("stop", timeout=120)  # the rest of the stack: the load balancer (SIGUSR1), Prometheus
        time.sleep(2)  # clients meet the stopped stack
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
    assert not any(thread.is_alive() for thread in threads), "a client never returned"
    signalled = _sigterm_times(scaled, stop_started)

    # in flight: sent before the first replica got SIGTERM, still unanswered then, on a connection that was made
    in_flight = [o for o in outcomes if not o.refused and o.started < min(signalled) < o.ended]
    lost = [o.lost for o in outcomes if o.lost]
    statuses = Counter(o.status for o in outcomes if o.status is not None)
    refused = Counter(o.refused.split(":")[0] for o in outcomes if o.refused)
    in_flight_answers = Counter(o.status for o in in_flight)
    logger.info("drain: %d requests (%d answered 200 before the stop), answers %s (503 closing: %d), refused %s, "
                "lost %d; %d in flight when the replicas got SIGTERM: answers %s; the replicas stopped in %.1f s; "
                "HAProxy's no-server 503s: %d, replicas' draining 503s: %d",
                len(outcomes), served_before, dict(statuses), sum(o.status == 503 and o.closes for o in outcomes),
                dict(refused), len(lost), len(in_flight), dict(in_flight_answers), replicas_seconds,
                sum(o.no_server for o in outcomes), sum(o.draining for o in outcomes))
    assert served_before > 0, "no request was served before the stop"
    if lost:
        (lb_signalled,) = _sigterm_times([lb], stop_started, signum=signal.SIGUSR1)
        when = [f"sent {o.started - min(signalled):+.2f} s, cut {o.ended - min(signalled):+.2f} s after the first "
                f"replica's SIGTERM ({o.ended - lb_signalled:+.2f} s after HAProxy's SIGUSR1)"
                for o in outcomes if o.lost]
        # HAProxy's log line for each request that did not end normally (termination state other than "--")
        windows = [(o.started - 0.3, o.ended + 0.3) for o in outcomes if o.lost]
        abnormal = []
        for line in docker("logs", lb).splitlines():
            accepted = re.search(r"\[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d+)\]", line)
            if accepted is None or re.search(r" ---- \d+/", line):
                continue
            at = datetime.strptime(accepted.group(1) + "+0000", "%d/%b/%Y:%H:%M:%S.%f%z").timestamp()
            if any(start <= at <= end for start, end in windows):
                abnormal.append(line)
        abnormal = abnormal[:10]
        raise AssertionError(f"{len(lost)} requests lost after they were accepted: {Counter(lost).most_common(5)}; "
                             f"{when[:5]}; HAProxy's abnormal endings: {abnormal}")
    # a 502 or 504 would be a request that HAProxy had forwarded and a replica dropped
    # (HAProxy's own 503 once every replica is out, before the load balancer stops, was never forwarded)
    unexpected = Counter(o.status for o in outcomes
                         if o.status not in (200, None)
                         and not (o.status == 503 and (o.closes or o.no_server or o.draining)))
    samples = [o.body for o in outcomes if o.status not in (200, None)][:3]
    assert not unexpected, f"answers other than 200 and a refusing 503: {unexpected}; e.g. {samples}"
    kinds = Counter("draining" if o.draining else "no server" if o.no_server else str(o.status) for o in in_flight)
    assert in_flight_answers[200] > 0, f"no request in flight at SIGTERM was served: {dict(kinds)}"
    for container in [*scaled, lb]:
        state = inspect(container)["State"]
        assert not state["Running"] and state["ExitCode"] == 0 and not state["OOMKilled"], state
