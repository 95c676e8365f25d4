"""The robustnorm service against LitServe serving the same model, single-JPEG requests, closed loop.

Protocol:
- servers, each a subprocess on 127.0.0.1 with the same torch intra-op thread count (``--threads``, passed as
  ``OMP_NUM_THREADS`` to both and as ``torch.set_num_threads`` to LitServe's worker):
  ``robustnorm-serve --max-batch-size 32 --max-wait 0.005`` (otherwise default settings: the bundled default
  model under its card's policy, drift metrics as the service's default) and ``benchmarks/litserve_app.py``
  (LitServe 0.2.19, the same model's weights in eval mode with frozen statistics, ``max_batch_size=32``,
  ``batch_timeout=0.005``, one worker, one API server); both start before the first run and stay up until the
  last; while one server is measured the others are paused (SIGSTOP to their process groups; ``--no-pause-others``
  leaves them running): an idle LitServe polls its queues and takes a share of a core (``idle_cpu_cores``, measured
  before the runs);
- load: ``benchmarks/loadgen.py``, closed loop at each ``--concurrency`` (default 1, 8, 32, 128), a warm-up
  then ``--duration`` seconds counted; each point runs ``--repeats`` times (default 3) alternating the servers
  (robustnorm, LitServe, robustnorm, ...) and reports the median of the runs: 200-only throughput, p50 and
  p99 latency, and the service's mean batch size (from its /metrics);
- images: 64 synthetic JPEGs (smooth gradients with noise; the default), or with ``--images cifar10`` 64 of
  CIFAR-10's test JPEGs (quality 75) spread over the classes, from ``$ROBUSTNORM_CIFAR10/test.tar.gz``: clean
  traffic, on which the cards' ``auto`` gate holds the population statistics (the synthetic images move it);
- at concurrency 1, the engine's own time for one image (``engine.run`` on n = 1 under the served policy, on
  the same images decoded as the service does, in this process with the same threads, median), so that
  "p50 <= forward + 2 ms" can be checked (``forward_check``); the forward is the run most batches take, whose
  per-layer drift is not scored (beyond ``drift_max_rate``), and the run with it scored is reported beside it;
  the service's mean forward time during the run, from its metrics, is reported too.

Drift-metrics mode (``--drift-metrics after,off``): the service alone at ``--concurrency`` (default 128,
saturation), one server per value of its ``drift_metrics`` setting (passed as ``ROBUSTNORM_DRIFT_METRICS``;
``MODE+SETTING=V`` also sets another setting, e.g. ``after+drift_max_rate=0``), runs alternating between them.
Skipped, with a message, when the service has no such setting.

    python benchmarks/serve_compare.py --threads 2       # -> benchmarks/results/serving/compare_cpu_2thread.json
    python benchmarks/serve_compare.py --threads 1 --client raw   # -> .../compare_cpu_1thread_raw.json
    python benchmarks/serve_compare.py --threads 2 --drift-metrics after,off --concurrency 128

Writes a PNG (throughput and p99 against concurrency) beside the JSON when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
from loadgen import make_jpegs, run_load
from plotting import pyplot

import robustnorm
import robustnorm.data
from service.engines import GroupSpec, load_engine
from service.imaging import Preprocessing, decode_image
from service.settings import Settings

logger = logging.getLogger("serve_compare")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving"
MAX_BATCH_SIZE = 32
BATCH_TIMEOUT = 0.005
LITSERVE_VERSION = "0.2.19"
FORWARD_MARGIN_MS = 2.0
PAUSE_S = 0.015  # an idle engine between two runs, as between requests at light load


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess in a session of its own (LitServe starts worker processes: all stop together)."""

    def __init__(self, name: str, command: list[str], ready_path: str, env: dict[str, str], log: Path,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = log.open("w")
        command = [part.replace("{port}", str(self.port)) for part in command]
        logger.info("starting %s: %s", name, " ".join(command))
        self.process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env}, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {self.process.returncode}; see {log}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not become ready in 300 s; see {log}")

    def pause(self) -> None:
        """SIGSTOP to the server's process group: it takes no CPU while the other server is measured."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM to the server's process group; SIGKILL after 20 s."""
        if self.process.poll() is None:
            self.resume()
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def proc_stat(path: Path) -> tuple[int, float] | None:
    """From a process's or thread's ``/proc/.../stat``: its process group and the CPU seconds (user + system)
    it has used so far; None when it is gone."""
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group_cpu_seconds(group: int) -> float:
    """CPU seconds (user + system) the processes of process group ``group`` have used so far."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        stat = proc_stat(entry / "stat") if entry.name.isdigit() else None
        if stat is not None and stat[0] == group:
            total += stat[1]
    return total


def idle_cpu(servers: dict[str, Server], images: list[bytes], seconds: float = 5.0) -> dict[str, float]:
    """Cores each server takes while idle, measured after it answered a few requests (Linux only)."""
    if not Path("/proc/self/stat").exists():
        return {}
    for server in servers.values():
        for image in images[:8]:
            httpx.post(server.url + "/predict", files={"file": ("image.jpg", image, "image/jpeg")}, timeout=30)
    time.sleep(1.0)
    before = {name: _group_cpu_seconds(server.process.pid) for name, server in servers.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    return {name: round((_group_cpu_seconds(server.process.pid) - before[name]) / elapsed, 4)
            for name, server in servers.items()}


def robustnorm_server(args: argparse.Namespace, env: dict[str, str], log: Path) -> Server:
    command = [sys.executable, "-m", "service", "--max-batch-size", str(MAX_BATCH_SIZE), "--max-wait",
               str(BATCH_TIMEOUT), "--port", "{port}", "--device", args.device, "--log-level", "warning"]
    if args.model:
        command += ["--model", args.model]
    return Server("robustnorm", command, "/readyz", env, log)


def litserve_server(args: argparse.Namespace, env: dict[str, str], log: Path) -> Server:
    command = [sys.executable, "benchmarks/litserve_app.py", "--max-batch-size", str(MAX_BATCH_SIZE),
               "--batch-timeout", str(BATCH_TIMEOUT), "--threads", str(args.threads), "--port", "{port}",
               "--device", args.device.split(":")[0], "--policy", args.litserve_policy]
    if args.model:
        command += ["--model", args.model]
    return Server("litserve", command, "/health", env, log)


def drift_environment(value: str) -> dict[str, str]:
    """The service's environment for one drift-metrics value: ``MODE`` or ``MODE+SETTING=V+...``, e.g.
    ``after+drift_max_rate=0`` (every batch scored after the answers)."""
    mode, *extra = value.split("+")
    environment = {"ROBUSTNORM_DRIFT_METRICS": mode}
    for item in extra:
        name, _, setting = item.partition("=")
        environment[f"ROBUSTNORM_{name.upper()}"] = setting
    return environment


def engine_forward_ms(args: argparse.Namespace, images: list[bytes], repeats: int = 200) -> dict[str, Any]:
    """Median milliseconds of the service engine's ``run`` on one image under the served policy, the images
    taken in turn: without the per-layer drift (``median_ms``, what batches beyond ``drift_max_rate`` run) and
    with it scored in the run (``scored_median_ms``), alternating, back to back; then without the drift, each run
    after the engine was idle for ``PAUSE_S`` (``after_pause_median_ms``), as between requests at light load."""
    torch.set_num_threads(args.threads)
    settings = Settings(model=args.model, device=args.device, max_batch_size=MAX_BATCH_SIZE)
    engine = load_engine(settings)
    card = engine.card
    channels, height, width = (int(v) for v in card.input_size)
    spec = Preprocessing(channels=channels, height=height, width=width, mean=tuple(card.mean), std=tuple(card.std),
                         max_pixels=settings.max_image_pixels)
    pixels = [decode_image(image, spec)[None] for image in images]
    groups = [GroupSpec(1)]
    times: dict[str, list[float]] = {"none": [], "now": []}
    for i in range(10 + repeats):
        for drift, measured in times.items():
            started = time.perf_counter()
            engine.run(pixels[i % len(pixels)], groups, engine.policy, drift=drift)
            if i >= 10:
                measured.append(time.perf_counter() - started)
    paused = []
    for i in range(repeats // 2):
        time.sleep(PAUSE_S)
        started = time.perf_counter()
        engine.run(pixels[i % len(pixels)], groups, engine.policy, drift="none")
        paused.append(time.perf_counter() - started)
    ran = engine.run(pixels[0], groups, engine.policy, drift="none")[1].groups[0].statistics
    engine.close()
    return {"policy": str(engine.policy), "model": card.name, "engine": type(engine).__name__,
            "median_ms": 1e3 * statistics.median(times["none"]),
            "scored_median_ms": 1e3 * statistics.median(times["now"]),
            "after_pause_median_ms": 1e3 * statistics.median(paused), "pause_s": PAUSE_S, "statistics": ran,
            "runs": repeats}


def cifar10_jpegs(count: int = 64) -> list[bytes]:
    """``count`` JPEGs of CIFAR-10's test archive as they are stored, spread evenly over it (and its classes)."""
    root = robustnorm.data.find_cifar10()
    if root is None or not (root / "test.tar.gz").is_file():
        raise SystemExit(f"--images cifar10 needs {robustnorm.data.CIFAR10_ENV} set to the folder holding "
                         "test.tar.gz")
    with tarfile.open(root / "test.tar.gz", mode="r|*") as archive:
        blobs = [handle.read() for member in archive if member.isfile() and member.name.lower().endswith(".jpg")
                 and (handle := archive.extractfile(member)) is not None]
    step = max(1, len(blobs) // count)
    return blobs[::step][:count]


def _median(runs: list[dict[str, Any]], get: Callable[[dict[str, Any]], float | None]) -> float | None:
    values = [value for value in map(get, runs) if value is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over a point's runs of what the report shows."""
    return {
        "throughput_ok_per_s": _median(runs, lambda r: r["throughput_ok_per_s"]),
        "p50_ms": _median(runs, lambda r: r["latency_ms"]["p50"]),
        "p99_ms": _median(runs, lambda r: r["latency_ms"]["p99"]),
        "mean_batch_size": _median(runs, lambda r: (r["batch_sizes"] or {}).get("mean_batch_size")),
        "inference_mean_ms": _median(runs, lambda r: r.get("inference_mean_ms")),
        "non_200": sum(sum(v for k, v in r["answered"].items() if k != "200") + r["transport_errors_total"]
                       for r in runs),
    }


def measure(servers: dict[str, Server], args: argparse.Namespace, images: list[bytes]) -> list[dict[str, Any]]:
    """Every concurrency, ``repeats`` rounds of alternating servers; one row per server and concurrency."""
    rows = []
    for concurrency in args.concurrency:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for repeat in range(args.repeats):
            for name, server in servers.items():
                if args.pause_others:
                    for other in servers.values():
                        if other is not server:
                            other.pause()
                server.resume()
                report = run_load(server.url, images, concurrency=concurrency, duration=args.duration,
                                  warmup=args.warmup, timeout=args.timeout, metrics=True, seed=repeat,
                                  client=args.client)
                runs[name].append(report)
                logger.info("c=%-4d %-12s run %d: %7.1f/s  p50 %6.1f ms  p99 %6.1f ms  batch %s", concurrency, name,
                            repeat + 1, report["throughput_ok_per_s"], report["latency_ms"]["p50"] or float("nan"),
                            report["latency_ms"]["p99"] or float("nan"),
                            f"{report['batch_sizes']['mean_batch_size']:.1f}" if report["batch_sizes"] else "-")
        for name, measured in runs.items():
            rows.append({"server": name, "concurrency": concurrency, **summarise(measured), "runs": measured})
    return rows


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _event_loop() -> dict[str, str]:
    """uvicorn's event loop ("auto": uvloop when installed, for both servers) and LitServe's HTTP parser
    ("auto": httptools when installed, as the service's own protocol is)."""
    return {"loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "litserve_http": "httptools" if importlib.util.find_spec("httptools") else "h11"}


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Throughput and p99 against concurrency, one line per server; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    figure, (throughput, tail) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(row["server"] for row in report["results"]):
        rows = [row for row in report["results"] if row["server"] == name]
        x = [row["concurrency"] for row in rows]
        throughput.plot(x, [row["throughput_ok_per_s"] for row in rows], marker="o", label=name)
        tail.plot(x, [row["p99_ms"] for row in rows], marker="o", label=name)
    for axis, ylabel in ((throughput, "answers (200) / s"), (tail, "p99 latency (ms)")):
        levels = sorted({row["concurrency"] for row in report["results"]})
        axis.set(xscale="log", xlabel="concurrent clients", ylabel=ylabel)
        axis.set_xticks(levels, labels=[str(c) for c in levels])
        axis.set_xticks([], minor=True)
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    tail.set_yscale("log")
    figure.suptitle(f"{report['model']}, batch <= {MAX_BATCH_SIZE}, timeout {BATCH_TIMEOUT * 1e3:g} ms, "
                    f"{report['torch_threads']} torch thread(s), {report['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    logs = args.out.parent
    images = cifar10_jpegs(64) if args.images == "cifar10" else make_jpegs(64, size=args.image_size, seed=0)
    report: dict[str, Any] = {
        "what": "closed-loop single-JPEG requests (multipart) to POST /predict; per point the median of the "
                "runs, which alternate between the servers; throughput counts 200s only",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(["python", *sys.argv]),
        "device": args.device, "torch_threads": args.threads, "concurrency": args.concurrency,
        "duration_s": args.duration, "warmup_s": args.warmup, "repeats": args.repeats, "client": args.client,
        "pause_others": args.pause_others,
        "max_batch_size": MAX_BATCH_SIZE, "batch_timeout_s": BATCH_TIMEOUT, "images": args.images,
        "image_size": args.image_size if args.images == "synthetic" else None,
        "machine": (f"{_cpu_name()}, {os.cpu_count()} cores" if args.device == "cpu" else
                    torch.cuda.get_device_name() if torch.cuda.is_available() else args.device),
        "event_loop": _event_loop(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "robustnorm": robustnorm.__version__},
    }
    if args.drift_metrics:
        if "drift_metrics" not in Settings.model_fields:
            message = ("the service has no drift_metrics setting, so drift scoring cannot be turned off; "
                       "the drift-metrics comparison is skipped")
            logger.warning(message)
            return {**report, "skipped": message, "results": []}
        values = args.drift_metrics.split(",")
        servers = {f"drift_metrics={value}": robustnorm_server(args, {**env, **drift_environment(value)},
                                                               logs / f"{args.out.stem}-{value}.log")
                   for value in values}
        report.update(mode="drift_metrics", drift_metrics=values)
    else:
        report["engine_forward_n1"] = engine_forward_ms(args, images) if 1 in args.concurrency else None
        start = {"robustnorm": robustnorm_server, "litserve": litserve_server}
        servers = {name: start[name](args, env, logs / f"{args.out.stem}-{name}.log") for name in args.servers}
        report.update(mode="compare", litserve={"version": LITSERVE_VERSION, "policy": args.litserve_policy,
                                                "workers": 1, "api_servers": 1})
    try:
        robustnorm_url = next((server.url for name, server in servers.items() if name != "litserve"), None)
        served = httpx.get(robustnorm_url + "/v1/model", timeout=10).json() if robustnorm_url else {}
        report.update(model=served.get("name", args.model or "default"), served_policy=served.get("policy"))
        report["idle_cpu_cores"] = idle_cpu(servers, images)
        logger.info("idle servers take %s cores", report["idle_cpu_cores"])
        report["results"] = measure(servers, args, images)
    finally:
        for server in servers.values():
            server.stop()
    forward = report.get("engine_forward_n1")
    one = next((row for row in report["results"] if row["server"] == "robustnorm" and row["concurrency"] == 1), None)
    if forward and one and one["p50_ms"] is not None:
        report["forward_check"] = {"p50_ms": one["p50_ms"], "forward_ms": forward["median_ms"],
                                   "forward_after_pause_ms": forward.get("after_pause_median_ms"),
                                   "margin_ms": FORWARD_MARGIN_MS,
                                   "holds": one["p50_ms"] <= forward["median_ms"] + FORWARD_MARGIN_MS}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundled model name or directory (default: the service's default)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' for both servers (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each server (default 1)")
    parser.add_argument("--concurrency", type=lambda text: [int(v) for v in text.split(",")], default=None,
                        help="comma-separated client counts (default 1,8,32,128; drift mode 128)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds counted per run (default 20)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before each run (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per server and point (default 3)")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (default 30 s)")
    parser.add_argument("--images", choices=("synthetic", "cifar10"), default="synthetic",
                        help="what the clients send: synthetic JPEGs (default) or CIFAR-10 test JPEGs (clean "
                             "traffic; needs ROBUSTNORM_CIFAR10)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the synthetic JPEGs (default 32)")
    parser.add_argument("--servers", type=lambda text: text.split(","), default=["robustnorm", "litserve"],
                        help="comma-separated servers to run, in this order (default robustnorm,litserve)")
    parser.add_argument("--litserve-policy", default="frozen", help="LitServe's statistics policy (default frozen)")
    parser.add_argument("--drift-metrics", help="drift-metrics mode: comma-separated values of the service's "
                                                "drift_metrics setting to compare, e.g. after,off or "
                                                "after,after+drift_max_rate=0,off")
    parser.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                        help="the load generator's client: httpx (default), or loadgen's lean raw HTTP/1.1 client, "
                             "which leaves more of a shared machine's CPU to the servers")
    parser.add_argument("--pause-others", action=argparse.BooleanOptionalAction, default=True,
                        help="pause the servers not being measured (SIGSTOP to their process groups; default on)")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/serving/...)")
    args = parser.parse_args(argv)
    args.concurrency = args.concurrency or ([128] if args.drift_metrics else [1, 8, 32, 128])
    if unknown := set(args.servers) - {"robustnorm", "litserve"}:
        parser.error(f"unknown server(s) {sorted(unknown)}: choose among robustnorm, litserve")
    kind = "drift_metrics" if args.drift_metrics else "compare"
    client = "" if args.client == "httpx" else f"_{args.client}"
    client += "_cifar10" if args.images == "cifar10" else ""
    args.out = args.out or RESULTS / f"{kind}_{args.device.split(':')[0]}_{args.threads}thread{client}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    report = run(args)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    picture = plot(report, args.out.with_suffix(".png")) if report["results"] else None
    print(json.dumps({"json": str(args.out), "png": str(picture) if picture else None,
                      "skipped": report.get("skipped"), "forward_check": report.get("forward_check")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
