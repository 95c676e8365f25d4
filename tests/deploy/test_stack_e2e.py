"""End to end: the compose stack's real components on loopback, fed real traffic, read through Prometheus.

Started here as the compose file wires them: two replicas of the real service (``robustnorm-serve``), HAProxy
with the shipped ``haproxy.cfg`` in front of them, and Prometheus (Debian's 2.42) with the shipped
``prometheus.yml`` and alert rules. Only what needs Docker's network is rewritten: scrape targets and
HAProxy's servers point at loopback ports (replicas are found by DNS in compose), the scrape and evaluation
intervals are 1 s, and the copy of the rules has every ``for:`` shortened to 2 s so that an alert can become
pending or firing within the test. No query is padded (``or vector(0)``): an empty result fails.

Traffic, in order: clean CIFAR-10 images in every request form, requests the service must reject, a stream
of noise images (a shifted stream, which must raise the batch-drift alert), then a headless locust run of 20
users for 20 s with the shipped locustfile. Then every dashboard expression and every alert-rule selector is
queried through Prometheus' HTTP API.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import math
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml
from deploy_support import (
    DEPLOY,
    LOCUSTFILE,
    PROMETHEUS_DIR,
    Process,
    PrometheusAPI,
    alert_rules,
    dashboard_queries,
    free_port,
    grouping_labels,
    loopback_haproxy_config,
    noise_png,
    numbers,
    require_tool,
    run_tool,
    selectors,
    skip_or_fail,
    wait_http_ok,
    wait_until,
    write_rules_shortened,
)

import robustnorm

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

REPLICAS = 2
TEST_FOR = "2s"  # every rule's `for:` in the test's copy of the rules
RATE_INTERVAL = "1m"  # stands in for Grafana's $__rate_interval (>= 4 scrapes); spans the whole traffic phase
LOCUST_USERS = 20
LOCUST_SECONDS = 20
QUEUE_LIMIT = 64  # images a replica queues at most
NOISE_REQUESTS = 48  # 32 noise images each: more batches than the clean phase, so the median batch drifts


@dataclass
class Stack:
    replicas: list[str]  # base URLs
    lb: str
    prometheus: PrometheusAPI
    processes: list[Process]
    workdir: Path

    def logs(self) -> str:
        return "\n".join(process.log_tail() for process in self.processes)


@dataclass
class Traffic:
    clean_codes: list[int] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    drift_alerts: list[dict[str, Any]] = field(default_factory=list)
    noise_scores: list[float] = field(default_factory=list)
    clean_single_kl: list[float] = field(default_factory=list)  # worst layer of each replica's latest batch
    noise_kl: list[float] = field(default_factory=list)
    locust_exit: int | None = None
    locust_output: str = ""
    locust_stats: list[dict[str, str]] = field(default_factory=list)
    locust_failures: list[dict[str, str]] = field(default_factory=list)


def _test_prometheus_config(workdir: Path, replicas: list[str], lb_stats: str, prometheus: str) -> Path:
    """The shipped prometheus.yml and rules, targets on loopback, 1 s intervals, `for:` shortened."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    loopback = {"robustnorm": replicas, "loadbalancer": [lb_stats], "prometheus": [prometheus]}
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": loopback.pop(job["job_name"])}]
    assert not loopback, f"jobs missing from prometheus.yml: {sorted(loopback)}"
    write_rules_shortened(workdir / "rules", TEST_FOR)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _test_haproxy_config(workdir: Path, replicas: list[str], lb: str, lb_stats: str) -> Path:
    """The shipped haproxy.cfg with loopback binds and the replicas as servers instead of a DNS template."""
    path = workdir / "haproxy.cfg"
    path.write_text(loopback_haproxy_config(replicas, lb, lb_stats))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    serve = require_tool("robustnorm-serve", "pip install -e '.[service]'")
    if not os.environ.get("ROBUSTNORM_MODEL") and not robustnorm.list_models():
        skip_or_fail("no bundled model to serve (and ROBUSTNORM_MODEL is not set to a model directory)")
    prometheus_bin = require_tool("prometheus", "apt-get install -y prometheus")
    haproxy_bin = require_tool("haproxy", "apt-get install -y haproxy")
    workdir = tmp_path_factory.mktemp("stack")
    processes: list[Process] = []
    try:
        replica_ports = [free_port() for _ in range(REPLICAS)]
        for number, port in enumerate(replica_ports, 1):
            # One thread each: two replicas, Prometheus, HAProxy and locust share two cores.
            # A short queue (one full request), so that a flood is answered 429 as a saturated replica would.
            args = [serve, "--host", "127.0.0.1", "--port", str(port), "--queue-limit", str(QUEUE_LIMIT),
                    "--max-images-per-request", str(QUEUE_LIMIT)]
            # The drift alert is driven under frozen statistics, where every batch has a calibrated score, put
            # in each answer (inline) for the test to read; under the cards' auto policy, batches that run
            # stream statistics carry no batch score (docs/drift.md).
            processes.append(Process(f"replica{number}", args, workdir,
                                     env={"OMP_NUM_THREADS": "1", "ROBUSTNORM_LOG_LEVEL": "warning",
                                          "ROBUSTNORM_POLICY": "frozen", "ROBUSTNORM_DRIFT_METRICS": "inline"}))
        replicas = [f"127.0.0.1:{port}" for port in replica_ports]
        lb, lb_stats, prom = (f"127.0.0.1:{free_port()}" for _ in range(3))
        haproxy = Process("haproxy", [haproxy_bin, "-db", "-f",
                                      str(_test_haproxy_config(workdir, replicas, lb, lb_stats))], workdir)
        processes.append(haproxy)
        config = _test_prometheus_config(workdir, replicas, lb_stats, prom)
        prometheus = Process("prometheus", [prometheus_bin, f"--config.file={config}",
                                            f"--storage.tsdb.path={workdir / 'tsdb'}",
                                            f"--web.listen-address={prom}"], workdir)
        processes.append(prometheus)

        for process, address in zip(processes, replicas):
            wait_http_ok(process, f"http://{address}/readyz", timeout=120)
        wait_http_ok(prometheus, f"http://{prom}/-/ready", timeout=30)
        api = PrometheusAPI(f"http://{prom}")

        def all_up() -> bool:
            targets = api.targets()
            return len(targets) == REPLICAS + 2 and all(target["health"] == "up" for target in targets)

        wait_until(all_up, 30, "every scrape target up")
        wait_http_ok(haproxy, f"http://{lb}/readyz", timeout=15)

        def every_server_up() -> bool:  # HAProxy's own view: traffic must be able to reach every replica
            lines = httpx.get(f"http://{lb_stats}/stats;csv", timeout=5).text.splitlines()
            header = lines[0].lstrip("# ").split(",")
            rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line.startswith("replicas,")]
            servers = [row for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")]
            return len(servers) == REPLICAS and all(row["status"].startswith("UP") for row in servers)

        wait_until(every_server_up, 60, "HAProxy reports every replica UP")
        yield Stack(replicas=[f"http://{address}" for address in replicas], lb=f"http://{lb}", prometheus=api,
                    processes=processes, workdir=workdir)
    finally:
        for process in reversed(processes):
            process.stop()


def _cifar_sample(archive: Path, count: int) -> list[bytes]:
    """``count`` test images spread over every class (the archive is ordered by class)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and PurePosixPath(m.name).suffix == ".jpg"]
        step = max(1, len(members) // count)
        return [tar.extractfile(member).read() for member in members[::step][:count]]  # type: ignore[union-attr]


def _multipart(images: list[bytes], media_type: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.img", data, media_type)) for i, data in enumerate(images)]


def _worst_layer_kl(stack: Stack) -> list[float]:
    """For each replica, the largest per-layer KL of its latest batch (from /v1/stats)."""
    worst = []
    for replica in stack.replicas:
        layers = httpx.get(f"{replica}/v1/stats", timeout=10).json()["latest"]["layers"]
        worst.append(max(layer["kl"] for layer in layers.values()))
    return worst


def _single_images(client: httpx.Client, images: list[bytes]) -> list[int]:
    """One image per request, one request at a time: batches of one, the noisiest statistics there are."""
    return [client.post("/predict", content=image, headers={"Content-Type": "image/jpeg"}).status_code
            for image in images]


def _clean_phase(client: httpx.Client, images: list[bytes]) -> list[int]:
    """Every other request form, and a burst of concurrent single images (so batches of many sizes form)."""
    responses = []
    for size in (4, 8, 16, 32):
        responses.append(client.post("/predict", files=_multipart(images[8:8 + size], "image/jpeg")))
    encoded = [base64.b64encode(image).decode() for image in images[40:43]]
    responses.append(client.post("/predict", json={"images": encoded}))
    with ThreadPoolExecutor(max_workers=24) as pool:
        responses += list(pool.map(
            lambda image: client.post("/predict", content=image, headers={"Content-Type": "image/jpeg"}),
            images[50:98]))
    return [response.status_code for response in responses]


def _flood(client: httpx.Client, image: bytes, attempts: int = 5) -> int:
    """Concurrent requests of 32 images each, more than both queues hold: the service answers 429."""
    for _ in range(attempts):
        with ThreadPoolExecutor(max_workers=16) as pool:
            codes = list(pool.map(lambda _: client.post("/predict", files=_multipart([image] * 32, "image/jpeg")
                                                        ).status_code, range(16)))
        if 429 in codes:
            return 429
    return max(codes)


def _rejection_phase(client: httpx.Client, image: bytes) -> dict[str, int]:
    return {
        "queue_full": _flood(client, image),
        "deadline": client.post("/predict", params={"timeout": 1e-6}, content=image,
                                headers={"Content-Type": "image/jpeg"}).status_code,
        "bad_image": client.post("/predict", content=b"not an image",
                                 headers={"Content-Type": "image/jpeg"}).status_code,
        "unsupported_type": client.post("/predict", content=b"hello",
                                        headers={"Content-Type": "text/plain"}).status_code,
        "too_many_images": client.post("/predict", files=_multipart([image] * 65, "image/jpeg")).status_code,
        "invalid": client.post("/predict", params={"top_k": 0}, content=image,
                               headers={"Content-Type": "image/jpeg"}).status_code,
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def traffic(stack: Stack, cifar10: Path) -> Traffic:
    """All the traffic, in order; what each phase saw is kept for the tests to judge."""
    seen = Traffic()
    images = _cifar_sample(cifar10 / "test.tar.gz", 100)
    with httpx.Client(base_url=stack.lb, timeout=30) as client:
        seen.clean_codes = _single_images(client, images[:8])
        seen.clean_single_kl = _worst_layer_kl(stack)
        seen.clean_codes += _clean_phase(client, images)
        seen.rejected = _rejection_phase(client, images[0])
        for request in range(NOISE_REQUESTS):
            noise = [noise_png(request * 100 + i) for i in range(32)]
            response = client.post("/predict", files=_multipart(noise, "image/png"))
            if response.status_code == 200:
                seen.noise_scores += [p["batch"]["drift_score"] for p in response.json()["predictions"][:1]]
        seen.noise_kl = _worst_layer_kl(stack)

    def drift_alert() -> list[dict[str, Any]]:
        return stack.prometheus.query('ALERTS{alertname="RobustnormBatchDriftHigh"}')

    try:
        seen.drift_alerts = wait_until(drift_alert, 30, "RobustnormBatchDriftHigh pending or firing")
    except AssertionError:
        logger.warning("RobustnormBatchDriftHigh did not become pending; batch scores of the noise: %s",
                       seen.noise_scores)

    locust = require_tool("locust", "pip install locust")
    prefix = stack.workdir / "locust"
    result = run_tool([locust, "-f", str(LOCUSTFILE), "--headless", "--users", str(LOCUST_USERS),
                       "--spawn-rate", "10", "--run-time", f"{LOCUST_SECONDS}s", "--stop-timeout", "10",
                       "--host", stack.lb, "--csv", str(prefix), "--only-summary",
                       "--images", str(cifar10 / "test.tar.gz"), "--max-images", "500"],
                      timeout=LOCUST_SECONDS + 90)
    seen.locust_exit = result.returncode
    seen.locust_output = (result.stdout + result.stderr)[-4000:]
    if Path(f"{prefix}_stats.csv").is_file():
        seen.locust_stats = _read_csv(Path(f"{prefix}_stats.csv"))
        seen.locust_failures = _read_csv(Path(f"{prefix}_failures.csv"))
    time.sleep(2)  # two scrapes and evaluations after the last request
    return seen


# ------------------------------------------------------------------------------------------ the service


def test_healthcheck_script_reports_readiness(stack: Stack) -> None:
    script = str(DEPLOY / "docker" / "healthcheck.py")
    port = stack.replicas[0].rsplit(":", 1)[1]
    assert run_tool([sys.executable, script], env={"ROBUSTNORM_PORT": port}).returncode == 0
    assert run_tool([sys.executable, script], env={"ROBUSTNORM_PORT": str(free_port())}).returncode == 1


def test_clean_traffic_is_served_and_bad_requests_rejected(stack: Stack, traffic: Traffic) -> None:
    assert traffic.clean_codes and set(traffic.clean_codes) == {200}, (traffic.clean_codes, stack.logs())
    assert traffic.rejected == {"queue_full": 429, "deadline": 504, "bad_image": 400, "unsupported_type": 415,
                                "too_many_images": 413, "invalid": 422}


# ------------------------------------------------------------------------------------------ alerts


def test_noise_stream_raises_the_batch_drift_alert(stack: Stack, traffic: Traffic) -> None:
    scores = sorted(traffic.noise_scores)
    assert len(scores) == NOISE_REQUESTS and scores[len(scores) // 2] > 3, scores  # the alert's median
    assert traffic.drift_alerts, "RobustnormBatchDriftHigh never became pending or firing"
    for alert in traffic.drift_alerts:
        assert alert["metric"]["alertstate"] in ("pending", "firing")
        assert alert["metric"]["job"] == "robustnorm" and alert["metric"]["severity"] == "warning"
    instances = {alert["metric"]["instance"] for alert in traffic.drift_alerts}
    assert instances <= {url.removeprefix("http://") for url in stack.replicas}


def test_layer_drift_threshold_lies_above_clean_one_image_batches(traffic: Traffic) -> None:
    """RobustnormLayerDriftHigh's KL threshold lies above what clean one-image batches show: the noisiest
    statistics clean traffic produces, so light clean traffic cannot trip it."""
    (rule,) = [rule for rule in alert_rules() if rule["alert"] == "RobustnormLayerDriftHigh"]
    threshold = float(re.search(r'measure="kl"\}\[\w+\]\)\)\s*>\s*([\d.]+)', rule["expr"]).group(1))
    logger.info("worst layer KL: clean one-image batches %s, noise batches %s; threshold %s",
                traffic.clean_single_kl, traffic.noise_kl, threshold)
    assert traffic.clean_single_kl and max(traffic.clean_single_kl) < threshold


def test_alert_rules_load_and_evaluate_without_errors(stack: Stack, traffic: Traffic) -> None:
    groups = stack.prometheus.rule_groups()
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_every_alert_selector_returns_series_with_the_labels_the_rule_uses(stack: Stack, traffic: Traffic) -> None:
    """Each selector matches series, all of them carrying `job` and `instance` (per-replica alerts), and every
    label the rule groups or matches on (`layer`, `le`) is carried by the series of some selector."""
    for rule in alert_rules():
        expected = grouping_labels(rule["expr"])
        carried: set[str] = set()
        for selector in selectors(rule["expr"]):
            found = stack.prometheus.series(selector)
            assert found, f"{rule['alert']}: {selector} matches no series"
            for labels in found:
                missing = {"job", "instance"} - labels.keys()
                assert not missing, f"{rule['alert']}: {selector} lacks {missing}"
                carried |= labels.keys()
        assert expected <= carried, f"{rule['alert']}: no series carries {expected - carried}"


# ------------------------------------------------------------------------------------------ locust


def test_locust_run_has_no_failures_but_429s(traffic: Traffic) -> None:
    assert traffic.locust_stats, f"locust wrote no CSV summary:\n{traffic.locust_output}"
    total = next(row for row in traffic.locust_stats if row["Name"] == "Aggregated")
    requests = int(total["Request Count"])
    rejected = sum(int(row["Occurrences"]) for row in traffic.locust_failures if "429 queue full" in row["Error"])
    other = [row for row in traffic.locust_failures if "429 queue full" not in row["Error"]]
    logger.info("locust: %d requests, %d answered 429 (counted apart), %.1f requests/s", requests, rejected,
                float(total["Requests/s"]))
    assert not other, f"failures other than 429: {other}"
    assert int(total["Failure Count"]) == rejected
    assert requests >= 5 * LOCUST_USERS, f"only {requests} requests in {LOCUST_SECONDS} s"
    names = {row["Name"] for row in traffic.locust_stats}
    assert {"/predict single", "/predict multipart", "/predict json", "/predict burst"} <= names
    assert traffic.locust_exit == 0, traffic.locust_output


# ------------------------------------------------------------------------------------------ dashboard


def test_every_dashboard_expression_returns_data(stack: Stack, traffic: Traffic) -> None:
    empty = []
    for title, expr in dashboard_queries(RATE_INTERVAL):
        values = numbers(stack.prometheus.query(expr))
        if not values or all(math.isnan(value) for value in values):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_instance_variable_lists_every_replica(stack: Stack, traffic: Traffic) -> None:
    found = {labels["instance"] for labels in stack.prometheus.series('robustnorm_model_info{job="robustnorm"}')}
    assert found == {url.removeprefix("http://") for url in stack.replicas}


# ------------------------------------------------------------------------------------------ scale-out


def test_load_balancer_spreads_requests_and_sums_work(stack: Stack, traffic: Traffic) -> None:
    at = time.time()
    per_replica = stack.prometheus.query(
        'sum by (instance) (increase(robustnorm_requests_total{job="robustnorm", route="/predict", code="200"}[10m]))',
        at)
    counts = {item["metric"]["instance"]: float(item["value"][1]) for item in per_replica}
    assert set(counts) == {url.removeprefix("http://") for url in stack.replicas}
    assert min(counts.values()) > 0.2 * max(counts.values()), f"unbalanced: {counts}"
    (total,) = numbers(stack.prometheus.query(
        'sum(increase(robustnorm_requests_total{job="robustnorm", route="/predict", code="200"}[10m]))', at))
    assert total == pytest.approx(sum(counts.values()), rel=1e-6)
    (active,) = numbers(stack.prometheus.query('haproxy_backend_active_servers{proxy="replicas"}'))
    assert active == REPLICAS


def test_kubernetes_scrape_config_discovers_annotated_pods(stack: Stack, tmp_path: Path) -> None:
    """deploy/k8s/prometheus-config.yaml's relabelling, run for real: Debian's Prometheus has no Kubernetes
    discovery, so a file_sd file plays the API server, listing two pods as the pod role would (address, pod
    labels and annotations as __meta_kubernetes_* labels): an annotated robustnorm pod whose annotation
    points at a real replica, and a pod without the scrape annotation, which must be dropped."""
    prometheus_bin = require_tool("prometheus", "apt-get install -y prometheus")
    manifest = yaml.safe_load((DEPLOY / "k8s" / "prometheus-config.yaml").read_text())
    config = yaml.safe_load(manifest["data"]["prometheus.yml"])
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    config["rule_files"] = []
    (job,) = config["scrape_configs"]
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")]}]
    replica_port = stack.replicas[0].rsplit(":", 1)[1]
    pod = {"__meta_kubernetes_namespace": "serving", "__meta_kubernetes_pod_label_app_kubernetes_io_name": "robustnorm",
           "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
           "__meta_kubernetes_pod_annotation_prometheus_io_port": replica_port,
           "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics"}
    (tmp_path / "pods.json").write_text(json.dumps([
        {"targets": ["127.0.0.1:9"], "labels": {**pod, "__meta_kubernetes_pod_name": "robustnorm-7d9f-abcde"}},
        {"targets": ["127.0.0.1:9"], "labels": {
            **{k: v for k, v in pod.items() if "prometheus_io_scrape" not in k},
            "__meta_kubernetes_pod_name": "robustnorm-unannotated"}},
    ]))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    process = Process("prometheus-k8s", [prometheus_bin, f"--config.file={tmp_path / 'prometheus.yml'}",
                                         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                         f"--web.listen-address={address}"], tmp_path)
    try:
        wait_http_ok(process, f"http://{address}/-/ready", timeout=30)
        api = PrometheusAPI(f"http://{address}")
        (target,) = wait_until(lambda: [t for t in api.targets() if t["health"] == "up"], 20, "the pod scraped")
        assert target["labels"] == {"job": "robustnorm", "instance": "robustnorm-7d9f-abcde", "namespace": "serving"}
        assert target["scrapeUrl"] == f"http://127.0.0.1:{replica_port}/metrics"
        assert len(api.targets()) == 1  # the unannotated pod was dropped
    finally:
        process.stop()


def test_prometheus_is_the_version_the_readme_names() -> None:
    prometheus_bin = require_tool("prometheus", "apt-get install -y prometheus")
    result = run_tool([prometheus_bin, "--version"])
    version = result.stdout + result.stderr
    match = re.search(r"version (\d+\.\d+)", version)
    assert match, version
    readme = (DEPLOY / "README.md").read_text()
    assert f"Prometheus {match.group(1)}" in readme, f"deploy/README.md should name Prometheus {match.group(1)}"

