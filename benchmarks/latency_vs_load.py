"""Latency against offered load, and how busy the engine is: why a tenant's p99 rises with the others' load.

Starts ``robustnorm-serve`` (bundled default model, one intra-op thread) on 127.0.0.1 as ``benchmarks/overload.py``
does, measures its capacity (the best closed loop of ``--concurrency`` clients), then offers Poisson arrivals of
single-JPEG requests (examples/cat.jpg) at each ``--loads`` share of that capacity for ``--seconds`` each. Per
load: the client's latency percentiles (from each request's due time), and from the service's metrics the mean
batch size, the mean time of a batch in the engine, the mean wait in the queue, and the engine's busy share (the
engine's seconds over the wall-clock seconds). Small batches cost more per image than large ones, so the engine
is busier than the offered share of the capacity suggests, and the queue grows earlier.

    python benchmarks/latency_vs_load.py --service-cpus 1   # -> benchmarks/results/overload/latency_vs_load-<date>.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import overload
from loadgen import parse_histogram
from plotting import pyplot, save

SERIES = {"batch_size": "robustnorm_batch_size", "engine_s": "robustnorm_inference_duration_seconds",
          "queue_wait_s": "robustnorm_queue_wait_seconds"}


def scrape(url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram of SERIES."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {}
    for key, name in SERIES.items():
        histogram = parse_histogram(text, name)
        found[key] = (histogram["sum"], histogram["count"]) if histogram else (0.0, 0.0)
    return found


def point(port: int, url: str, body: bytes, rate: float, seconds: float, deadline: float) -> dict[str, Any]:
    before, started = scrape(url), time.perf_counter()
    outcomes = asyncio.run(overload.open_loop(port, body, {"": rate}, seconds=seconds, deadline=deadline, seed=3))
    wall = time.perf_counter() - started
    after = scrape(url)
    latency = np.array([o.done - o.due for o in outcomes if o.status == 200 and o.done is not None]) * 1e3
    delta = {key: (after[key][0] - before[key][0], after[key][1] - before[key][1]) for key in SERIES}
    return {
        "offered_per_s": round(rate, 1), "sent": len(outcomes),
        "answered_200": len(latency),
        "latency_200_ms": {f"p{q}": round(float(np.percentile(latency, q)), 1) if len(latency) else None
                           for q in (50, 90, 99)},
        "mean_batch_size": round(delta["batch_size"][0] / max(1.0, delta["batch_size"][1]), 2),
        "engine_ms_per_batch": round(1e3 * delta["engine_s"][0] / max(1.0, delta["engine_s"][1]), 2),
        "queue_wait_ms_mean": round(1e3 * delta["queue_wait_s"][0] / max(1.0, delta["queue_wait_s"][1]), 2),
        "engine_busy_share": round(delta["engine_s"][0] / wall, 3),
    }


def plot(report: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    points = report["points"]
    loads = [100 * p["load"] for p in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for q, style in (("p50", "-o"), ("p90", "-s"), ("p99", "-^")):
        left.plot(loads, [p["latency_200_ms"][q] for p in points], style, label=q)
    left.set_xlabel("offered load (% of capacity)")
    left.set_ylabel("latency of 200s (ms)")
    left.set_title(f"latency against load (capacity {report['capacity_per_s']:.0f}/s)")
    left.legend()
    right.plot(loads, [100 * p["engine_busy_share"] for p in points], "-o", label="engine busy (%)")
    right.plot(loads, loads, "--", color="grey", label="offered load (%)")
    right.plot(loads, [p["mean_batch_size"] for p in points], "-s", label="mean batch size")
    right.set_xlabel("offered load (% of capacity)")
    right.set_title("the engine's busy share and batch size")
    right.legend()
    save(figure, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                        help="offered loads, as shares of the measured capacity")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each load")
    parser.add_argument("--deadline", type=float, default=5.0, help="the service's request deadline (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32, 64],
                        help="closed-loop clients for the capacity (the best of these)")
    overload.add_service_cpus(parser)
    parser.add_argument("--out", type=Path, default=overload.RESULTS)
    args = parser.parse_args(argv)
    overload.pin_service(parser, args.service_cpus)
    body = (overload.REPO / "examples" / "cat.jpg").read_bytes()
    points = []
    with tempfile.TemporaryDirectory(prefix="latency-") as logs, overload.service(
            "--request-deadline", str(args.deadline), log=Path(logs) / "service.log") as url:
        port = int(url.rsplit(":", 1)[1])
        asyncio.run(overload.closed_loop(port, body, concurrency=max(args.concurrency), seconds=3.0,
                                         deadline=args.deadline))
        capacity = max(result["ok_per_s"] for result in overload.closed_loops(
            port, body, args.concurrency, 10.0, args.deadline).values())
        for load in args.loads:
            measured = point(port, url, body, load * capacity, args.seconds, args.deadline)
            points.append({"load": load, **measured})
            print(f"{100 * load:.0f}% of {capacity:.0f}/s: {measured}", flush=True)
    commit = overload.served_commit()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S +0000", time.gmtime()), "commit": commit,
              "what": __doc__.split("\n\n")[1].replace("\n", " "),
              "service": ["robustnorm-serve (bundled default model)", "--request-deadline", str(args.deadline),
                          "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "1")],
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "service_cpus": sorted(overload.SERVICE_CPUS) or "shared with the client"},
              "capacity_per_s": capacity, "points": points}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"latency_vs_load-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if plot(report, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
