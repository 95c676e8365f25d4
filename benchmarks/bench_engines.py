"""Benchmark the service's two engines, PyTorch and ONNX Runtime, across batch sizes.

Each measurement is one engine's ``run`` on a micro-batch of ``n`` images in one statistics group: the
model with its adaptive statistics, the recorded batch statistics, the drift report and the per-image
answers, i.e. what the service runs per batch (no HTTP, no decoding, no queueing). Engines alternate per
batch size, so a change in the machine's load hits both alike; the load average is recorded with the results.

    python benchmarks/bench_engines.py                       # CPU, both engines -> benchmarks/results/engines_cpu.json
    python benchmarks/bench_engines.py --threads 1           # one intra-op thread each -> engines_cpu_1thread.json
    python benchmarks/bench_engines.py --device cuda         # the same on a GPU -> engines_cuda.json

On a CPU that other processes also use, run PyTorch with ``OMP_WAIT_POLICY=PASSIVE`` (set before Python starts):
with OpenMP's default busy-waiting, its intra-op threads stall for about half a second per batch while another
busy process holds the cores (``engines_cpu_omp_active.json``); ONNX Runtime's engine does not busy-wait.

Writes a PNG beside the JSON when matplotlib is installed. The model is the service's default bundled model
when one is bundled, else a ResNet-20 with RobustNorm and random weights (speed does not depend on weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import robustnorm
from robustnorm.policy import Policy
from service.engines import Engine, GroupSpec, default_model, load_engine
from service.settings import Settings

logger = logging.getLogger("bench_engines")

RESULTS = Path(__file__).parent / "results"
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _model_dir(name: str | None, scratch: Path) -> str:
    """The model to serve: ``name``, the service's default (a bundled model), or a random RobustNorm ResNet-20
    saved in ``scratch`` when nothing is bundled."""
    if name:
        return name
    if robustnorm.list_models():
        return default_model()
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm="robustnorm", p=0.2).eval()
    card = robustnorm.ModelCard(name="random-resnet20-robustnorm", architecture="resnet20", norm="robustnorm",
                                p=0.2, labels=[f"class{i}" for i in range(10)], policy="adaptive:16")
    robustnorm.save_model(model, card, scratch)
    return str(scratch)


def _time(engine: Engine, images: torch.Tensor, policy: Policy, min_runs: int, min_seconds: float,
          max_runs: int) -> list[float]:
    """Seconds per ``engine.run`` after two warm-up runs, until both minimums (or ``max_runs``) are met."""
    groups = [GroupSpec(images.shape[0])]
    for _ in range(2):
        engine.run(images, groups, policy)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - started < min_seconds):
        begin = time.perf_counter()
        engine.run(images, groups, policy)
        if engine.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return times


def _summary(times: list[float], n: int) -> dict[str, float | int]:
    ordered = sorted(times)
    median = statistics.median(ordered)
    return {"runs": len(ordered), "median_ms": 1e3 * median, "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))],
            "min_ms": 1e3 * ordered[0], "images_per_second": n / median}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model = _model_dir(args.model, Path(scratch))
        engines: dict[str, Engine] = {}
        skipped: dict[str, str] = {}
        for kind in args.engines:
            settings = Settings(model=model, device=args.device, engine=kind, max_batch_size=max(args.sizes),
                                pad_batches="off")
            try:
                engines[kind] = load_engine(settings, threads=args.threads)
            except (ValueError, ImportError) as error:  # e.g. no onnxruntime-gpu where the GPU run happens
                logger.warning("skipping the %s engine: %s", kind, error)
                skipped[kind] = str(error)
        if not engines:
            raise SystemExit(f"no engine could start: {skipped}")
        card = next(iter(engines.values())).card
        policy = robustnorm.parse_policy(args.policy)
        load_before = os.getloadavg()
        rows: list[dict[str, Any]] = []
        generator = torch.Generator().manual_seed(0)
        for n in args.sizes:
            images = torch.randn(n, *card.input_size, generator=generator)
            for kind, engine in engines.items():
                times = _time(engine, images, policy, args.min_runs, args.min_seconds, args.max_runs)
                row = {"engine": kind, "n": n, **_summary(times, n)}
                rows.append(row)
                logger.info("%-5s n=%-4d %8.2f ms  %8.1f images/s", kind, n, row["median_ms"],
                            row["images_per_second"])
        load_after = os.getloadavg()
        providers = {kind: getattr(engine, "providers", None) for kind, engine in engines.items()}
        devices = {kind: str(engine.device) for kind, engine in engines.items()}
        for engine in engines.values():
            engine.close()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {
        "what": "seconds per engine.run on one micro-batch of n images (one statistics group): model with "
                "adaptive statistics, recorded batch statistics, drift report and answers; median over runs",
        "model": card.name, "version": card.version, "policy": str(policy),
        "device": args.device, "engine_devices": devices, "providers": providers,
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": args.threads or "default (one per physical core)",
        "load_average_before": load_before, "load_average_after": load_after,
        "environment": {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": ort_version, "robustnorm": robustnorm.__version__},
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "skipped": skipped,
        "results": rows,
    }


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Throughput and latency against batch size, one line per engine; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in dict.fromkeys(row["engine"] for row in report["results"]):
        rows = [row for row in report["results"] if row["engine"] == kind]
        label = {"torch": "PyTorch", "onnx": "ONNX Runtime"}.get(kind, kind)
        throughput.plot([r["n"] for r in rows], [r["images_per_second"] for r in rows], marker="o", label=label)
        latency.plot([r["n"] for r in rows], [r["median_ms"] for r in rows], marker="o", label=label)
    sizes = sorted({row["n"] for row in report["results"]})
    for axis, ylabel in ((throughput, "images / s"), (latency, "median latency per batch (ms)")):
        axis.set(xscale="log", yscale="log", xlabel="images per micro-batch", ylabel=ylabel)
        axis.set_xticks(sizes, labels=[str(n) for n in sizes])
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    threads = report["onnxruntime_threads"]
    threads_text = f"{threads} intra-op thread(s) per engine" if isinstance(threads, int) else "default threads"
    where = report["gpu"] or f"{report['cpu']}, {report['cpu_count']} cores, {threads_text}"
    figure.suptitle(f"{report['model']}, policy {report['policy']}, {where}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundled model name, model directory or .onnx file (default: see above)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]' (default cpu)")
    parser.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--policy", default="adaptive:16",
                        help="statistics policy (default adaptive:16: batch statistics from 16 images)")
    parser.add_argument("--sizes", type=lambda text: [int(v) for v in text.split(",")], default=list(SIZES),
                        help="comma-separated batch sizes (default 1,2,4,...,256)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of both engines (default 0: each library's own default)")
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-runs", type=int, default=200)
    parser.add_argument("--output", type=Path, help="JSON file (default benchmarks/results/engines_<device>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run(args)
    suffix = f"_{args.threads}thread" if args.threads else ""
    output = args.output or RESULTS / f"engines_{args.device.split(':')[0]}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    picture = plot(report, output.with_suffix(".png"))
    print(json.dumps({"json": str(output), "png": str(picture) if picture else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
