"""Time one ResNet-20 training step (batch 128) per norm layer, precision and memory layout.

    python benchmarks/bench_train_step.py --threads 1 --compile --out benchmarks/results/train_step_cpu_1thread.json

Measures forward, loss, backward and SGD step on random images, after warm-up, as the median of ``--repeats``
timed steps (``--compile`` adds bf16 channels-last rows under ``torch.compile``, compiled in the warm-up).
RobustNorm's channels-last rows are timed with both hand-written training normalisations
(``range_layout``: ``wide``, the CPU's, and ``rows``, the accelerators'); the layer picks one by device, and
the other row shows what that choice is worth on this device.

    python benchmarks/bench_train_step.py --device cuda --compile --out benchmarks/results/train_step_cuda.json

Records the machine's load average so that figures taken beside other work can be read as such: compare rows
of one file, not across files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from robustnorm import create_model, layers

VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


RANGE_LAYOUTS = {"wide": layers._RangeNormalize, "rows": layers._RangeNormalizeRows}


def time_step(norm: str, precision: str, channels_last: bool, repeats: int, device: torch.device,
              range_layout: str | None = None, compiled: str | None = None) -> float:
    if range_layout is not None:  # the layer looks both names up at every training forward: force one layout
        layers._RangeNormalize = layers._RangeNormalizeRows = RANGE_LAYOUTS[range_layout]
    try:
        return _time_step(norm, precision, channels_last, repeats, device, compiled)
    finally:
        layers._RangeNormalize, layers._RangeNormalizeRows = RANGE_LAYOUTS["wide"], RANGE_LAYOUTS["rows"]


def _time_step(norm: str, precision: str, channels_last: bool, repeats: int, device: torch.device,
               compiled: str | None) -> float:
    torch.manual_seed(0)
    model = create_model("resnet20", norm=norm, **({"p": 1.0} if norm == "robustnorm" else {})).to(device).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(128, 3, 32, 32, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (128,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    network = torch.compile(model, mode=compiled) if compiled else model  # compiled during the warm-up steps

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(network(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true",
                        help="also time bf16 channels-last steps under torch.compile, on CUDA also with CUDA graphs "
                        "(robustnorm train --compile [reduce-overhead])")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step_cpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compile_modes: tuple[str, ...] = ()
    if args.compile:  # CUDA graphs (reduce-overhead) only where there are kernel launches to save
        compile_modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)
    rows = []
    for norm in ("bn", "robustnorm"):
        for precision, channels_last in VARIANTS:
            layouts = ["wide", "rows"] if norm == "robustnorm" and channels_last else [None]
            for range_layout in layouts:
                seconds = time_step(norm, precision, channels_last, args.repeats, device, range_layout)
                rows.append({"norm": norm, "precision": precision, "channels_last": channels_last,
                             **({"range_layout": range_layout} if range_layout else {}),
                             "ms_per_step": round(1000 * seconds, 1), "epoch_s_45k": round(seconds * 45000 / 128)})
                print(rows[-1], flush=True)
        for mode in compile_modes:
            seconds = time_step(norm, "bf16", True, args.repeats, device, compiled=mode)
            rows.append({"norm": norm, "precision": "bf16", "channels_last": True, "compiled": mode,
                         "ms_per_step": round(1000 * seconds, 1), "epoch_s_45k": round(seconds * 45000 / 128)})
            print(rows[-1], flush=True)
    result = {"device": str(device), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average_at_end": os.getloadavg(), "batch": 128, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
