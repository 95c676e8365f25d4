"""CPU time the service spends per answered request, by thread: where an answer's time goes.

Throughput on a machine shared with the load generator (or with anything else) moves with what else runs;
the CPU time a server spends per answer moves much less, so it can compare two versions of the service, or
show which thread is the bottleneck (the event loop, the engine, decoding, drift scoring), on a busy machine.

Protocol: for each checkout (``--checkouts``, repository roots; default this one), ``python -m service
--max-batch-size 32 --max-wait 0.005`` is started from that checkout (its own code on ``PYTHONPATH``, this
interpreter and packages) with ``OMP_NUM_THREADS=--threads``, the bundled default model and default settings.
For each ``--concurrency`` a closed loop of single-JPEG requests (``benchmarks/loadgen.py``) runs a warm-up,
then ``--duration`` seconds of requests, each server thread's CPU time (user + system, from
``/proc/PID/task/TID/stat``) read before the first and after the last is answered; the figure is that time over
the requests answered 200. Runs alternate between the checkouts, ``--repeats`` times, and the medians are
reported, with the throughput and the service's mean batch size (which change the per-request cost of the
engine). Threads are
named with ``py-spy dump`` where py-spy is installed (the main thread, which runs the event loop, is always
known: its id is the process id); threads py-spy does not name, such as ONNX Runtime's intra-op pool, are summed
under ``native``.

    python benchmarks/cpu_per_request.py                                   # this checkout
    git worktree add /tmp/before <commit>
    python benchmarks/cpu_per_request.py --checkouts /tmp/before .          # before / after, alternating
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loadgen import make_jpegs, run_load
from serve_compare import Server, cifar10_jpegs, proc_stat

logger = logging.getLogger("cpu_per_request")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving"


class Service(Server):
    """``python -m service`` from ``checkout``, on a free loopback port."""

    def __init__(self, checkout: Path, threads: int, log: Path) -> None:
        self.checkout = checkout
        command = [sys.executable, "-m", "service", "--max-batch-size", "32", "--max-wait", "0.005",
                   "--port", "{port}", "--log-level", "warning"]
        super().__init__(f"the service from {checkout}", command, "/readyz",
                         {"PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}, log, cwd=checkout)

    def thread_names(self) -> dict[int, str]:
        """Thread id -> Python thread name, from py-spy (the main thread only without it)."""
        names = {self.process.pid: "MainThread"}
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(spy).exists():
            return names
        dump = subprocess.run([spy, "dump", "--pid", str(self.process.pid)], capture_output=True, text=True)
        for line in dump.stdout.splitlines():
            if line.startswith("Thread ") and '"' in line:
                names[int(line.split()[1], 0)] = line.split('"')[1]
        return names

    def cpu_seconds(self) -> dict[int, float]:
        """Thread id -> CPU seconds (user + system) so far."""
        stats = {int(task.name): proc_stat(task / "stat") for task in Path(f"/proc/{self.process.pid}/task").iterdir()}
        return {tid: stat[1] for tid, stat in stats.items() if stat is not None}  # None: the thread ended


def measure(service: Service, images: list[bytes], concurrency: int, duration: float, warmup: float,
            client: str = "httpx") -> dict[str, Any]:
    run_load(service.url, images, concurrency=concurrency, duration=warmup, warmup=0.0, metrics=False, client=client)
    names = service.thread_names()
    before, started = service.cpu_seconds(), time.monotonic()
    load = run_load(service.url, images, concurrency=concurrency, duration=duration, warmup=0.0, client=client)
    after = service.cpu_seconds()
    # The load starts with the window (no warm-up of its own) and the load generator waits for every request sent
    # in it: the CPU read covers exactly the requests sent, and those answered 200 are counted.
    answered = load["answered"].get("200", 0)
    per_thread: dict[str, float] = {}
    for thread, seconds in after.items():
        name = names.get(thread, "native")
        per_thread[name] = per_thread.get(name, 0.0) + seconds - before.get(thread, 0.0)
    per_request = {name: round(1000 * seconds / answered, 3) for name, seconds in sorted(per_thread.items())
                   if seconds > 0} if answered else {}
    return {"answers_per_s": load["throughput_ok_per_s"], "latency_ms": load["latency_ms"],
            "mean_batch_size": (load.get("batch_sizes") or {}).get("mean_batch_size"),
            "cpu_ms_per_request": per_request, "cpu_ms_per_request_total": round(sum(per_request.values()), 3),
            "window_s": round(time.monotonic() - started, 2)}


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    threads = sorted({name for run in runs for name in run["cpu_ms_per_request"]})
    return {"answers_per_s": statistics.median(run["answers_per_s"] for run in runs),
            "p50_ms": statistics.median(run["latency_ms"]["p50"] or 0.0 for run in runs),
            "mean_batch_size": statistics.median(run["mean_batch_size"] or 0.0 for run in runs),
            "cpu_ms_per_request_total": statistics.median(run["cpu_ms_per_request_total"] for run in runs),
            "cpu_ms_per_request": {name: statistics.median(run["cpu_ms_per_request"].get(name, 0.0) for run in runs)
                                   for name in threads}}


def _commit(checkout: Path) -> str | None:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return result.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkouts", type=Path, nargs="+", default=[ROOT],
                        help="repository roots whose service to measure (default: this one)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32], help="closed-loop clients")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds counted per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each run (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per checkout and point, alternating")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the service (default 1)")
    parser.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                        help="the load generator's client (loadgen.py; default httpx)")
    parser.add_argument("--images", choices=("synthetic", "cifar10"), default="synthetic",
                        help="synthetic JPEGs (default) or CIFAR-10 test JPEGs (needs ROBUSTNORM_CIFAR10), as in "
                             "serve_compare.py")
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/serving/...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    now = datetime.now(timezone.utc)
    out = args.out or RESULTS / f"cpu_per_request-{now:%Y-%m-%d}.json"
    images = cifar10_jpegs() if args.images == "cifar10" else make_jpegs()
    checkouts = [checkout.resolve() for checkout in args.checkouts]
    load_before = os.getloadavg()
    services = [Service(checkout, args.threads, out.with_name(f"{out.stem}-{i}.log"))
                for i, checkout in enumerate(checkouts)]
    results: dict[str, dict[str, Any]] = {str(checkout): {"commit": _commit(checkout), "points": {}}
                                          for checkout in checkouts}
    try:
        for concurrency in args.concurrency:
            runs: dict[str, list[dict[str, Any]]] = {str(checkout): [] for checkout in checkouts}
            for _ in range(args.repeats):
                for service in services:
                    run = measure(service, images, concurrency, args.duration, args.warmup, args.client)
                    runs[str(service.checkout)].append(run)
                    logger.info("%s, %d clients: %s", service.checkout, concurrency, json.dumps(run))
            for checkout, measured in runs.items():
                results[checkout]["points"][str(concurrency)] = {"median": _median_of(measured), "runs": measured}
    finally:
        for service in services:
            service.stop()
            service.log_path.unlink(missing_ok=True)
    report = {"date": f"{now:%Y-%m-%d %H:%M} UTC", "protocol": __doc__.split("\n\n")[2],
              "settings": vars(args) | {"checkouts": [str(c) for c in checkouts], "out": str(out)},
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_before": load_before,
                          "loadavg_after": os.getloadavg()},
              "checkouts": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    for checkout, result in results.items():
        for concurrency, point in result["points"].items():
            median = point["median"]
            print(f"{result['commit']} ({checkout}), {concurrency} clients: {median['answers_per_s']:.1f} answers/s, "
                  f"batch {median['mean_batch_size']:.1f}, CPU per answer {median['cpu_ms_per_request_total']:.2f} ms "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in median['cpu_ms_per_request'].items())})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
