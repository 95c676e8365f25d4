"""How long the service engine's run on one image takes after the engine was idle for a while.

At one client the engine never runs back to back: between two runs lie the answer's way to the client, the next
request's way in, its parsing and decoding, a millisecond or more. This measures the engine's ``run`` on one
image (the bundled default model under its served policy, without the per-layer drift, as batches beyond
``drift_max_rate`` run; the images of ``examples/`` in turn) right after the previous run, and after a gap of
each of ``--gaps`` milliseconds, spent sleeping or busy-waiting on the same thread. The gaps alternate in
``--rounds`` rounds, so that a drift of the machine's speed hits every gap alike; each gap's median pools its
rounds.

    .venv/bin/python benchmarks/forward_gap.py --threads 1   # -> benchmarks/results/forward_gap-<date>.json

Writes a PNG beside the JSON when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from plotting import pyplot, save

import robustnorm
from service.engines import GroupSpec, load_engine
from service.imaging import Preprocessing, decode_image
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
IMAGES = ("cat.jpg", "coffee.jpg", "horse.png", "rocket.jpg")


def _idle(seconds: float, how: str) -> None:
    if how == "sleep":
        time.sleep(seconds)
        return
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    engine = load_engine(Settings(device="cpu", engine="torch", max_batch_size=32))
    card = engine.card
    channels, height, width = (int(v) for v in card.input_size)
    spec = Preprocessing(channels=channels, height=height, width=width, mean=tuple(card.mean), std=tuple(card.std),
                         max_pixels=4096 * 4096)
    pixels = [decode_image((REPO / "examples" / name).read_bytes(), spec)[None] for name in IMAGES]
    groups = [GroupSpec(1)]

    def run(i: int) -> float:
        started = time.perf_counter()
        engine.run(pixels[i % len(pixels)], groups, engine.policy, drift="none")
        return time.perf_counter() - started

    for i in range(20):
        run(i)
    cases = [(gap, how) for gap in args.gaps for how in (("sleep", "spin") if gap else ("none",))]
    times: dict[tuple[float, str], list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for gap, how in cases:
            for i in range(args.runs):
                if gap:
                    _idle(gap / 1e3, how)
                times[gap, how].append(run(i))
    ran = engine.run(pixels[0], groups, engine.policy, drift="none")[1].groups[0].statistics
    engine.close()
    back_to_back = statistics.median(times[0.0, "none"]) if 0.0 in args.gaps else None
    rows = []
    for (gap, how), measured in times.items():
        median = statistics.median(measured)
        rows.append({"gap_ms": gap, "idle": how, "runs": len(measured), "median_ms": 1e3 * median,
                     "p90_ms": 1e3 * sorted(measured)[int(0.9 * (len(measured) - 1))],
                     "over_back_to_back": median / back_to_back if back_to_back else None})
    return {"what": "milliseconds of the service engine's run on one image (drift='none') after the engine was idle "
                    "for gap_ms, sleeping or busy-waiting on the same thread; gaps alternate in rounds",
            "model": card.name, "policy": str(engine.policy), "statistics": ran, "threads": torch.get_num_threads(),
            "rounds": args.rounds, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "robustnorm": robustnorm.__version__},
            "results": rows}


def plot(report: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for how, marker in (("sleep", "o"), ("spin", "s")):
        rows = [row for row in report["results"] if row["idle"] in (how, "none")]
        axis.plot([row["gap_ms"] for row in rows], [row["median_ms"] for row in rows], marker=marker, label=how)
    axis.set(xscale="symlog", xlabel="engine idle before the run (ms)", ylabel="run on one image, median (ms)",
             title=f"{report['model']}, {report['statistics']} statistics, {report['threads']} thread(s)")
    axis.set_ylim(bottom=0)
    axis.legend()
    save(figure, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.0, 0.2, 1.0, 3.0, 15.0],
                        help="idle gaps before a run, ms (0: back to back)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=60, help="runs per gap and round")
    parser.add_argument("--out", type=Path, default=RESULTS / f"forward_gap-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args(argv)
    report = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    for row in report["results"]:
        ratio = row["over_back_to_back"]
        print(f"gap {row['gap_ms']:5.1f} ms ({row['idle']:5s}): {row['median_ms']:.3f} ms"
              + (f", {ratio:.2f}x back to back" if ratio else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
