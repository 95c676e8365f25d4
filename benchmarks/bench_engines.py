"""Benchmark the service's engines: PyTorch and ONNX Runtime across batch sizes, or each policy's cost.

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

Per-policy mode (``--policies``): the PyTorch engine's ``run`` under each statistics policy (default frozen, batch,
blend:16, adaptive:16, stream:256:256, auto:256:256; stream policies feed the global stream), once with the
per-layer drift scored in the run (``engine P``: every batch with ``drift_max_rate=0``) and once without it
(``engine P unscored``, ``drift="none"``: a batch beyond ``drift_max_rate``, where ``frozen``, and ``auto`` while
its gate holds the population, run the folded model of ``robustnorm.fold``; the random images here, distinct batches
in turn, move the gate, so ``auto`` runs its stream statistics), and the grouped forward alone (``batch_groups``
under the policy, no recording, drift report or answers), against two references on the same threads, both plain
forwards: the model with its frozen statistics folded into the convolutions, and a copy with PyTorch's own
``nn.BatchNorm2d`` in train mode under ``torch.no_grad`` (``benchmarks/norm_references.py``). Every row's
``ratio_to_folded`` and ``ratio_to_bn_train`` are its throughput over the reference's (1.0: as fast; 0.5: half the
images per second). The candidates take turns one call at a time, in a new random order each turn, so that a change
in the machine's speed hits them alike (``--alternate rounds``: stretches of calls in ``--rounds`` rounds instead).
``--compile-sizes`` adds ``torch.compile``d folded-frozen and ``batch`` forwards at those sizes. On CUDA every
forward runs as the engine does: bf16 autocast and channels_last.

    python benchmarks/bench_engines.py --policies --threads 1                   # -> engines_policies_cpu_1thread.json
    python benchmarks/bench_engines.py --policies --architecture resnet50 --device cuda --compile-sizes 128

Writes a PNG beside the JSON when matplotlib is installed. The model is the service's default bundled model
when one is bundled, else a ResNet-20 with RobustNorm and random weights (speed does not depend on weights);
``--architecture`` takes random weights of a registered architecture instead (``resnet50``: 224x224).
``--quick`` measures briefly, for smoke runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from norm_references import fold_norms, random_model_dir, train_mode_batchnorm
from plotting import pyplot

import robustnorm
from robustnorm.policy import Policy
from service.engines import Engine, GroupSpec, default_model, load_engine
from service.engines.base import DriftWhen
from service.settings import Settings

logger = logging.getLogger("bench_engines")

RESULTS = Path(__file__).parent / "results"
SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
POLICIES = ("frozen", "batch", "blend:16", "adaptive:16", "stream:256:256", "auto:256:256")
POLICY_SIZES = (8, 128)


def _model_dir(name: str | None, scratch: Path, architecture: str | None = None) -> str:
    """The model to serve: ``name``, random weights of ``architecture``, the service's default (a bundled model),
    or a random RobustNorm ResNet-20 when nothing is bundled; random models are saved in ``scratch``."""
    if name:
        return name
    if architecture:
        return str(random_model_dir(architecture, scratch))
    if robustnorm.list_models():
        return default_model()
    return str(random_model_dir("resnet20", scratch, norm="robustnorm", policy="adaptive:16"))


def _time(engine: Engine, images: torch.Tensor, policy: Policy, min_runs: int, min_seconds: float,
          max_runs: int) -> list[float]:
    """Seconds per ``engine.run`` after two warm-up runs, until both minimums (or ``max_runs``) are met."""
    groups = [GroupSpec(images.shape[0])]
    sync = torch.cuda.synchronize if engine.device.type == "cuda" and torch.cuda.is_available() else lambda: None
    return _time_call(lambda: engine.run(images, groups, policy), sync, min_runs, min_seconds, max_runs)


def _time_call(call: Callable[[], object], sync: Callable[[], None], min_runs: int, min_seconds: float,
               max_runs: int) -> list[float]:
    """Seconds per ``call()`` (``sync`` waits for the device) after two warm-up calls, until both minimums (or
    ``max_runs``) are met."""
    for _ in range(2):
        call()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - started < min_seconds):
        begin = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - begin)
    return times


def _summary(times: list[float], n: int) -> dict[str, float | int]:
    ordered = sorted(times)
    median = statistics.median(ordered)
    return {"runs": len(ordered), "median_ms": 1e3 * median, "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))],
            "min_ms": 1e3 * ordered[0], "images_per_second": n / median}


def code_commit() -> str | None:
    """The commit of the checkout the ``robustnorm`` and ``service`` packages are imported from (``PYTHONPATH`` may
    point at another worktree, for an A/B run), with ``+changes`` when it has uncommitted changes; None outside git."""
    folder = Path(robustnorm.__file__).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True)
    if head.returncode != 0 or not head.stdout.strip():
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder, capture_output=True,
                           text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


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
        model = _model_dir(args.model, Path(scratch), args.architecture)
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
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": code_commit(),
        "skipped": skipped,
        "results": rows,
    }


def _candidates(engine: Any, policies: list[Policy], n: int, compiled: bool) -> dict[str, Callable[[], object]]:
    """Name -> one forward on ``n`` images, for the references, each policy's engine run and grouped forward,
    and (``compiled``) torch.compile'd folded-frozen and ``batch`` forwards."""
    device, model = engine.device, engine.model
    cuda = device.type == "cuda"
    # Distinct batches in turn, so many that a batch comes back only after a stream's window (256 images, a batch
    # adding at most 64) has let its images go: a stream counts each distinct image once, and the same batch again
    # and again would leave the streams (and the auto gate) with one batch's images.
    generator = torch.Generator().manual_seed(n)
    batches = [torch.randn(n, *engine.card.input_size, generator=generator) for _ in range(256 // min(n, 64) + 2)]
    # on the device as the engine runs them: channels_last tensors under bf16 autocast on CUDA
    on_device = [b.to(device).contiguous(memory_format=torch.channels_last) if cuda else b for b in batches]

    def turns(items: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
        cycle = itertools.cycle(items)
        return lambda: next(cycle)

    def autocast() -> contextlib.AbstractContextManager:
        return (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and torch.cuda.is_bf16_supported()
                else contextlib.nullcontext())

    def plain(net: torch.nn.Module, grad: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode
              ) -> Callable[[], object]:
        net = net.to(device, memory_format=torch.channels_last) if cuda else net
        pixels = turns(on_device)

        def forward() -> object:
            with grad(), autocast():
                return net(pixels())
        return forward

    def grouped(policy: Policy) -> Callable[[], object]:
        groups, pixels = [GroupSpec(n)], turns(on_device)

        def forward() -> object:
            with torch.inference_mode(), robustnorm.batch_groups(
                    model, [n], policy=policy, streams=engine.streams_for(policy, groups)), autocast():
                return model(pixels())
        return forward

    def run(policy: Policy, drift: DriftWhen) -> Callable[[], object]:
        groups, images = [GroupSpec(n)], turns(batches)
        return lambda: engine.run(images(), groups, policy, drift=drift)

    folded = fold_norms(model)
    calls: dict[str, Callable[[], object]] = {
        "folded": plain(folded), "bn_train": plain(train_mode_batchnorm(model), grad=torch.no_grad)}
    for policy in policies:
        calls[f"engine {policy}"] = run(policy, "now")
        calls[f"engine {policy} unscored"] = run(policy, "none")
        calls[f"forward {policy}"] = grouped(policy)
    if compiled:
        batch_model = robustnorm.set_policy(copy.deepcopy(model), "batch")  # the layers' own policy: no context
        calls["folded compiled"] = plain(torch.compile(folded))
        calls["forward batch compiled"] = plain(torch.compile(batch_model))
    return calls


Timings = dict[str, list[float]]


def _failed(errors: dict[str, str], n: int, name: str, error: Exception) -> None:
    """Note a candidate that cannot run (e.g. torch.compile without a working compiler): say so, go on."""
    logger.warning("n=%d %s failed: %s", n, name, error)
    errors[name] = f"{type(error).__name__}: {error}"[:500]


def _alternate_calls(calls: dict[str, Callable[[], object]], sync: Callable[[], None], args: argparse.Namespace,
                     n: int) -> tuple[Timings, dict[str, str]]:
    """Every candidate timed one call at a time in turns, in a new random order each turn, until each has
    ``--min-runs`` calls and the turns took ``--min-seconds`` per candidate (or one has ``--max-runs``): a change in
    the machine's speed, even over a second, hits every candidate alike."""
    times: Timings = {name: [] for name in calls}
    errors: dict[str, str] = {}
    for name, call in calls.items():  # two warm-up calls each (a compiled candidate compiles here)
        try:
            for _ in range(2):
                call()
            sync()
        except Exception as error:
            _failed(errors, n, name, error)
    order = [name for name in calls if name not in errors]
    shuffle = random.Random(n).shuffle
    budget, started = args.min_seconds * len(order), time.perf_counter()
    while order:
        shuffle(order)
        for name in order:
            begin = time.perf_counter()
            calls[name]()
            sync()
            times[name].append(time.perf_counter() - begin)
        runs = len(times[order[0]])
        if runs >= args.max_runs or (runs >= args.min_runs and time.perf_counter() - started >= budget):
            break
    return times, errors


def _alternate_rounds(calls: dict[str, Callable[[], object]], sync: Callable[[], None], args: argparse.Namespace,
                      n: int) -> tuple[Timings, dict[str, str]]:
    """Each candidate timed in ``--rounds`` stretches of its share of ``--min-seconds``, the candidates in turn."""
    times: Timings = {name: [] for name in calls}
    errors: dict[str, str] = {}
    for _ in range(args.rounds):
        for name, call in calls.items():
            if name in errors:
                continue
            try:
                times[name] += _time_call(call, sync, max(1, args.min_runs // args.rounds),
                                          args.min_seconds / args.rounds, max(1, args.max_runs // args.rounds))
            except Exception as error:
                _failed(errors, n, name, error)
    return times, errors


def run_policies(args: argparse.Namespace) -> dict[str, Any]:
    """Per-policy mode: every candidate of :func:`_candidates` at each batch size, alternating in rounds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = [robustnorm.parse_policy(text) for text in args.policies.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = _model_dir(args.model, Path(scratch), args.architecture)
        settings = Settings(model=model_dir, device=args.device, engine="torch", max_batch_size=max(args.sizes),
                            pad_batches="off")
        engine = load_engine(settings)
    card = engine.card
    cuda = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        compiled = n in args.compile_sizes
        calls = _candidates(engine, policies, n, compiled)
        alternate = _alternate_calls if args.alternate == "call" else _alternate_rounds
        times, errors = alternate(calls, sync, args, n)
        reference = {name: n / statistics.median(times[name]) for name in ("folded", "bn_train") if times[name]}
        for name, measured in times.items():
            row: dict[str, Any] = {"n": n, "candidate": name, "compiled": name.endswith("compiled")}
            if name in errors:
                rows.append({**row, "error": errors[name]})
                continue
            row.update(_summary(measured, n))
            for ref, ips in reference.items():
                row[f"ratio_to_{ref}"] = row["images_per_second"] / ips
            rows.append(row)
            logger.info("n=%-4d %-28s %9.3f ms %10.1f images/s  x%.2f of folded", n, name, row["median_ms"],
                        row["images_per_second"], row.get("ratio_to_folded", float("nan")))
    engine.close()
    return {
        "what": "seconds per call on one batch of n images: 'engine P' is the service engine's run under policy P "
                "(grouped forward, recorded statistics, drift report, answers), 'engine P unscored' the same "
                "without the per-layer drift (drift='none', a batch beyond drift_max_rate), 'forward P' the grouped "
                "forward "
                "alone; 'folded' (frozen statistics folded into the convolutions) and 'bn_train' (nn.BatchNorm2d "
                "in train mode, torch.no_grad) are plain forwards; ratio_to_X = images/s over X's images/s; "
                "median over runs, the candidates alternating as 'alternate' says",
        "model": card.name, "version": card.version, "architecture": card.architecture, "norm": card.norm,
        "input_size": list(card.input_size), "policies": [str(p) for p in policies],
        "device": str(engine.device), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "alternate": (
            "one call at a time, candidates in a new random order each turn" if args.alternate == "call"
            else f"{args.rounds} rounds of stretches"), "rounds": args.rounds if args.alternate == "rounds" else None,
        "compile_sizes": args.compile_sizes,
        "cuda_precision": "bf16 autocast, channels_last" if cuda else None,
        "gate_calibrated": getattr(engine, "gate", None) is not None,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "environment": {name: os.environ.get(name) for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "robustnorm": robustnorm.__version__},
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "commit": code_commit(),
        "results": rows,
    }


def plot_policies(report: dict[str, Any], path: Path) -> Path | None:
    """Throughput relative to the folded model, one panel per batch size; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    sizes = sorted({row["n"] for row in report["results"]})
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 5.5), squeeze=False)
    for axis, n in zip(axes[0], sizes):
        rows = [row for row in report["results"] if row["n"] == n and "ratio_to_folded" in row]
        names = [row["candidate"] for row in rows]
        colours = ["tab:gray" if name in ("folded", "bn_train") else "tab:purple" if row["compiled"] else
                   "tab:blue" if name.startswith("engine") else "tab:orange" for name, row in zip(names, rows)]
        axis.barh(names, [row["ratio_to_folded"] for row in rows], color=colours)
        for y, row in enumerate(rows):
            axis.text(row["ratio_to_folded"], y, f" {row['images_per_second']:.0f}/s", va="center", fontsize=7)
        if "bn_train" in names:
            axis.axvline(rows[names.index("bn_train")]["ratio_to_folded"], color="tab:gray", ls="--", lw=1)
        axis.axvline(1.0, color="black", lw=1)
        axis.invert_yaxis()
        axis.set(title=f"n = {n}", xlabel="throughput / folded-frozen throughput")
        axis.grid(alpha=0.3, axis="x")
    where = report["gpu"] or f"{report['cpu']}, {report['torch_threads']} thread(s)"
    figure.suptitle(f"{report['model']} ({report['architecture']}, {report['norm']}), {where}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Throughput and latency against batch size, one line per engine; None without matplotlib."""
    plt = pyplot()
    if plt is None:
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


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundled model name, model directory or .onnx file (default: see above)")
    parser.add_argument("--architecture", help="random weights of this registered architecture (e.g. resnet50)")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]' (default cpu)")
    parser.add_argument("--engines", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"])
    parser.add_argument("--policy", default="adaptive:16",
                        help="statistics policy (default adaptive:16: batch statistics from 16 images)")
    parser.add_argument("--sizes", type=_int_list, help="comma-separated batch sizes (default 1,2,4,...,256; "
                                                         "with --policies 8,128)")
    parser.add_argument("--policies", nargs="?", const=",".join(POLICIES),
                        help=f"per-policy mode with these comma-separated policies (alone: {','.join(POLICIES)})")
    parser.add_argument("--compile-sizes", type=_int_list, default=[],
                        help="per-policy mode: also torch.compile folded-frozen and batch at these batch sizes")
    parser.add_argument("--alternate", choices=["call", "rounds"], default="call",
                        help="per-policy mode: candidates take turns one call at a time, in a new random order each "
                             "turn (call, the default), or in --rounds stretches each (rounds)")
    parser.add_argument("--rounds", type=int, default=3, help="per-policy mode with --alternate rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 0.3 s and at least 2 runs per point")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of both engines (default 0: each library's own default)")
    parser.add_argument("--min-runs", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-runs", type=int, default=200)
    parser.add_argument("--output", type=Path, help="JSON file (default benchmarks/results/engines_<device>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.min_runs, args.min_seconds, args.max_runs = 2, 0.3, 20
    args.sizes = args.sizes or list(POLICY_SIZES if args.policies else SIZES)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = run_policies(args) if args.policies else run(args)
    suffix = f"_{args.threads}thread" if args.threads else ""
    kind = "engines_policies" if args.policies else "engines"
    output = args.output or RESULTS / f"{kind}_{args.device.split(':')[0]}{suffix}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    picture = (plot_policies if args.policies else plot)(report, output.with_suffix(".png"))
    print(json.dumps({"json": str(output), "png": str(picture) if picture else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
