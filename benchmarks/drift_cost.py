"""What batch drift scoring costs per batch, on the engine's own thread: one forward with recorded statistics
under the model's policy, then the per-layer drift and batch score (what ``drift_metrics`` moves off the
critical path) and the image scores (which stay in it), timed apart at several batch sizes.

    python benchmarks/drift_cost.py --threads 1     # -> benchmarks/results/drift_cost_cpu_1thread.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import robustnorm
from service.engines import GroupSpec, default_model, load_engine
from service.settings import Settings

RESULTS = Path(__file__).parent / "results"


def _median_ms(call, runs: int) -> float:
    call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="bundled model name or directory (default: the service's)")
    parser.add_argument("--policy", default="frozen", help="policy of the forward (default frozen: the cards' "
                                                           "drift calibration, so every group is scored)")
    parser.add_argument("--sizes", default="1,8,32,128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = load_engine(Settings(model=args.model or default_model(), device="cpu", engine="torch"))
    policy = robustnorm.parse_policy(args.policy)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in (int(size) for size in args.sizes.split(",")):
        pixels = torch.randn(n, *engine.card.input_size, generator=generator)
        _, report = engine.run(pixels, [GroupSpec(n)], policy, drift="later")
        assert report.pending is not None
        answer_ms = _median_ms(functools.partial(engine.run, pixels, [GroupSpec(n)], policy, drift="later"), args.runs)
        drift_ms = _median_ms(report.pending.compute, args.runs)
        rows.append({"n": n, "engine_run_without_batch_drift_ms": answer_ms, "batch_drift_ms": drift_ms,
                     "batch_drift_share": drift_ms / (answer_ms + drift_ms)})
        print(f"n={n:<4d} engine run {answer_ms:7.2f} ms   batch drift {drift_ms:6.2f} ms "
              f"({100 * drift_ms / (answer_ms + drift_ms):.0f}% of both)")
    report = {"what": "median ms per batch: the engine's run with recorded statistics and image scores but no "
                      "batch drift (drift='later'), and PendingDrift.compute (per-layer drift and batch score)",
              "model": engine.card.name, "policy": str(policy), "threads": args.threads,
              "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "torch": torch.__version__, "results": rows}
    out = args.out or RESULTS / f"drift_cost_cpu_{args.threads}thread.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"json": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
