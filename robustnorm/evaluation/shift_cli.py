"""``robustnorm evaluate --sections shift``: the shift grid's options and its results file.

The results file (default ``benchmarks/results/shift/grid.json``) is the evaluation's results store
(:mod:`.store`: atomic writes, ``--resume``): its identity is the data (the subset's size, the seed and
:data:`~.shift.COMMON_FROM`), not the grid, so a later run with ``--resume`` adds cells of other severities,
policies or sizes to the same file and skips the cells it holds; a model whose weights or policy changed
starts afresh. The file is rewritten after every policy and batch size of a model and severity.

Importing this module imports neither torch's models nor the corruptions (the ``shift`` extra), so the
``evaluate`` options stay cheap to list.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .shift import ShiftGrid

logger = logging.getLogger(__name__)

SHIFT_FORMAT = "shift/1"
DEFAULT_OUT = Path("benchmarks/results/shift/grid.json")
NOTES = ("Accuracy is the fraction of the cell's counted images predicted correctly, in whole batches of n (a "
         "partial last batch is left out). Stream policies (stream, auto) count the images after each stream's "
         "first WINDOW images (counted_from); common_accuracy counts, for every policy, the images from common_from "
         "on, the same images at every policy of a given n. Skewed cells serve the same corrupted images in runs of "
         "one class (every image of a class together, classes in a seeded order); single_class_batches is the "
         "fraction of their batches holding one class. Streams use a fresh StreamStore per cell with the service's "
         "defaults (one batch enters at most a quarter of the window).")


def add_shift_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the shift grid's options on the ``evaluate`` parser."""
    group = parser.add_argument_group("shift section (--sections shift)")
    group.add_argument("--shift-out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default: {DEFAULT_OUT})")
    group.add_argument("--shift-images", type=int, default=2000,
                       help="seeded, class-balanced test subset (default 2000; 10000 or more: every test image)")
    group.add_argument("--shift-policies", nargs="+", metavar="POLICY",
                       help="policies ('card': the card's own; default: frozen batch blend:16 blend:64 blend:512 "
                       "card adaptive:16 stream:256:256 auto:256:256); auto is skipped for a card without a gate")
    group.add_argument("--shift-sizes", type=int, nargs="+", metavar="N", help="batch sizes (default 1 8 32 128)")
    group.add_argument("--corruptions", nargs="+", metavar="NAME",
                       help="corruptions (default: CIFAR-10-C's 15 test corruptions)")
    group.add_argument("--severities", type=int, nargs="+", choices=range(1, 6), metavar="S",
                       help="severities 1-5 (default all)")
    group.add_argument("--skew-sizes", type=int, nargs="*", metavar="N",
                       help="batch sizes of the label-skewed cells (default 32 128; none: no skewed cells)")
    group.add_argument("--skew-severities", type=int, nargs="*", choices=range(1, 6), metavar="S",
                       help="severities of the label-skewed cells (default 5; clean skewed cells always run)")


def _grid(args: argparse.Namespace) -> ShiftGrid:
    from ..corruptions import TEST_CORRUPTIONS, get_corruption
    from .shift import (
        DEFAULT_POLICIES,
        DEFAULT_SIZES,
        DEFAULT_SKEW_SEVERITIES,
        DEFAULT_SKEW_SIZES,
        SEVERITIES,
        ShiftGrid,
    )

    def chosen(value: list | None, default: tuple) -> tuple:
        return tuple(default if value is None else value)

    corruptions = tuple(get_corruption(name).name for name in chosen(args.corruptions, TEST_CORRUPTIONS))
    return ShiftGrid(chosen(args.shift_policies, DEFAULT_POLICIES), chosen(args.shift_sizes, DEFAULT_SIZES),
                     corruptions, chosen(args.severities, SEVERITIES), chosen(args.skew_sizes, DEFAULT_SKEW_SIZES),
                     chosen(args.skew_severities, DEFAULT_SKEW_SEVERITIES))


def run_shift(args: argparse.Namespace, progress: bool) -> None:
    """Run the shift grid as ``args`` say and write ``args.shift_out``."""
    from dataclasses import asdict

    import torch

    from ..data import load_cifar10, to_float
    from ..io import load_model
    from ..policy import parse_policy
    from ..progress import progress_bar
    from .shift import (
        COMMON_FROM,
        card_gate,
        key_of,
        make_scenes,
        model_policies,
        run_cells,
        shift_cells,
        shift_images,
    )
    from .store import card_digest, gate_digest, merge_devices, resumable, write_results

    grid = _grid(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    test = load_cifar10("test", args.data)
    index = shift_images(test, args.shift_images, args.seed)
    x01, labels = to_float(test.images[index]).to(device), test.labels[index].to(device)
    report = {"format": SHIFT_FORMAT, "dataset": "CIFAR-10 (JPEG q75) test", "grid": "shift",
              "grid_spec": {"images": int(index.numel()), "common_from": COMMON_FROM,
                            "subset": "class-balanced" if index.numel() < len(test) else "every test image"},
              "seed": args.seed, "device": f"{device} (torch {torch.__version__})", "notes": NOTES, "runs": [],
              "models": []}
    earlier = resumable(args.shift_out, report) if args.resume else None
    if earlier is not None:
        report.update(models=earlier["models"], runs=earlier.get("runs", []),
                      device=merge_devices(earlier["device"], report["device"]))
    report["runs"].append({"date": dt.date.today().isoformat(), "models": list(args.models), "grid": asdict(grid)})

    runs = []  # (model, card, entry, pending cells)
    for name in args.models:
        model, card = load_model(name, device=device)
        entry = next((e for e in report["models"] if e["model"] == card.name), None)
        if entry is None or entry["card_digest"] != card_digest(card):
            if entry is not None:
                report["models"].remove(entry)
            entry = {"model": card.name, "version": card.version, "norm": card.norm, "card_policy": card.policy,
                     "card_digest": card_digest(card), "seconds": 0.0, "cells": []}
            report["models"].append(entry)
        gate = gate_digest(card)
        if entry.get("gate_digest") != gate:  # a recalibrated gate: its auto cells are stale
            entry["cells"] = [record for record in entry["cells"] if parse_policy(record["policy"]).kind != "auto"]
            entry["gate_digest"] = gate
        entry["skipped"] = {**entry.get("skipped", {}), **model_policies(card, grid)[1]}
        for policy, why in model_policies(card, grid)[1].items():
            logger.warning("%s: %s left out: %s", card.name, policy, why)
        held = {key_of(record) for record in entry["cells"]}
        runs.append((model, card, entry, [cell for cell in shift_cells(card, grid) if cell.key not in held]))
    logger.info("shift grid: %d cells to run on %d images (stream policies counted after their first WINDOW "
                "images)", sum(len(pending) for *_, pending in runs), index.numel())

    bar = progress_bar(total=sum(len(pending) for *_, pending in runs), desc="shift", unit="cell", enabled=progress)
    with bar:
        for severity in dict.fromkeys(cell.severity for *_, pending in runs for cell in pending):
            wanted = [[cell for cell in pending if cell.severity == severity] for *_, pending in runs]
            scenes = make_scenes(x01, labels, [cell for cells in wanted for cell in cells], args.seed)
            for (model, card, entry, _), cells in zip(runs, wanted):

                def save(records: list[dict], entry: dict = entry) -> None:
                    entry["cells"] += records
                    entry["seconds"] = round(entry["seconds"] + sum(record["seconds"] for record in records), 1)
                    write_results(args.shift_out, report)
                    bar.update(len(records))

                started = time.perf_counter()
                run_cells(model, card, cells, scenes, gate=card_gate(card), on_records=save)
                logger.info("%s severity %d: %d cells in %.0f s", card.name, severity, len(cells),
                            time.perf_counter() - started)
            del scenes
    write_results(args.shift_out, report)
    print(f"wrote {args.shift_out}")
