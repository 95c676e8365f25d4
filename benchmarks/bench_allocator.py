"""CPU throughput with and without :func:`robustnorm.runtime.retain_freed_memory` (glibc malloc settings).

    python benchmarks/bench_allocator.py --model cifar10-resnet20-bn --threads 1 \
        --out benchmarks/results/allocator_cpu_1thread.json

Each setting runs in a fresh process (malloc settings are process-wide): forward (no gradient) and forward
plus backward to the input (what an attack step costs), in batches of ``--n`` under ``frozen`` and ``batch``
statistics, ``--images`` images per call, best of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def measure(model_name: str, policy: str, n: int, images: int, repeats: int, threads: int) -> dict:
    import torch

    from robustnorm.io import load_model
    from robustnorm.runtime import retain_freed_memory
    from robustnorm.scoring import deployed_forward

    applied = retain_freed_memory()
    torch.set_num_threads(threads)
    model, card = load_model(model_name)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(images, *card.input_size, generator=generator)
    y = torch.randint(0, card.num_classes, (images,), generator=generator)
    forward = deployed_forward(model, card, policy, n)

    def best(step: Callable[[], None]) -> float:
        step()  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return images / min(times)

    def inference() -> None:
        with torch.no_grad():
            forward(x)

    def gradient() -> None:
        attacked = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(forward(attacked), y), attacked)

    return {"retain_freed_memory": applied, "policy": policy, "n": n, "forward_images_per_s": round(best(inference), 1),
            "forward_backward_images_per_s": round(best(gradient), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar10-resnet20-bn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/allocator_cpu_1thread.json"))
    parser.add_argument("--child", nargs=1, metavar="POLICY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.child[0], args.n, args.images, args.repeats, args.threads)))
        return
    rows = []
    for policy in ("frozen", "batch"):
        for setting in ("0", "1024"):
            env = dict(os.environ, ROBUSTNORM_RETAIN_FREED_MEMORY=setting, OMP_NUM_THREADS=str(args.threads))
            command = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads), "--n",
                       str(args.n), "--images", str(args.images), "--repeats", str(args.repeats), "--child", policy]
            done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    report = {"model": args.model, "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "images_per_call": args.images, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
