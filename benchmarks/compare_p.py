"""How RobustNorm's power p changes robustness, on models trained alike: a few whole-batch PGD cells each.

    python benchmarks/compare_p.py --models runs/gpu1/runs/bn runs/gpu1/runs/rn02 runs/gpu1/runs/rn10 \
        --out benchmarks/results/robustness/compare_p.json [--resume]

The full grid (``robustnorm evaluate``) costs hours per model on a CPU; this runs only the cells that compare
the networks: whole batches of n = 128 from the same 2,000 fixed test images as the grid (``--seed`` 0), PGD-20
at each eps, under ``frozen`` and ``batch``, with the adaptive gradient and the one transferred from the
frozen model. Each policy's "strongest" figure is the lower of the two, as in the headline table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import robustnorm
from robustnorm.data import load_cifar10, to_float
from robustnorm.evaluation.cells import Cell
from robustnorm.evaluation.craft import PerImageAttacks
from robustnorm.evaluation.grid import evaluation_images
from robustnorm.evaluation.run import run_cell
from robustnorm.runtime import retain_freed_memory
from robustnorm.scoring import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="bundled names or model directories")
    parser.add_argument("--eps-255", type=float, nargs="+", default=[2.0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness/compare_p.json"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows --out holds for the same weights and settings; run the other models")
    args = parser.parse_args()
    retain_freed_memory()
    # the grid's test order and robust subset (robustnorm evaluate with the same --seed)
    test = load_cifar10("test", args.data)
    test, subset = evaluation_images(test, len(test), args.images, args.seed)
    test_x01 = to_float(test.images)
    x01, labels = test_x01[subset], test.labels[subset]
    settings = {"images": int(subset.numel()), "n": args.n, "steps": args.steps, "threat": "whole"}
    earlier = json.loads(args.out.read_text()) if args.resume and args.out.is_file() else {}
    kept = earlier.get("rows", []) if {k: earlier.get(k) for k in settings} == settings else []
    rows = []
    for name in args.models:
        model, card = robustnorm.load_model(name)
        done = next((row for row in kept if row["model"] == name and row["version"] == card.version
                     and sorted({c["eps_255"] for c in row["cells"]}) == sorted(args.eps_255)), None)
        if done is not None:
            rows.append(done)
            continue
        row = {"model": name, "name": card.name, "version": card.version, "norm": card.norm, "p": card.p,
               "epochs": card.training.get("epochs"),
               "clean_frozen": accuracy(model, card, test_x01, test.labels, "frozen", 1),
               "clean_batch_n128": accuracy(model, card, test_x01, test.labels, "batch", args.n), "cells": []}
        per_image = PerImageAttacks()
        for eps_255 in args.eps_255:
            for policy in ("frozen", "batch"):
                for gradient in ("adaptive", "transfer"):
                    if policy == "frozen" and gradient == "transfer":
                        continue  # the same attack as the adaptive one
                    started = time.perf_counter()
                    cell = Cell.parse(policy, args.n, "whole", "pgd", eps_255, gradient)
                    record = run_cell(model, card, x01, labels, cell, steps=args.steps, seed=args.seed,
                                      per_image=per_image)
                    cell = {key: value for key, value in asdict(record).items() if key != "model"}
                    cell["seconds"] = round(time.perf_counter() - started, 1)
                    row["cells"].append(cell)
                    print(json.dumps({"model": name, **cell}), flush=True)
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**settings, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
