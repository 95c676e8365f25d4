"""``robustnorm evaluate``: the command line over :mod:`robustnorm.evaluation` (flags to arguments, files).

Runs the grid and the drift evidence for each model on CIFAR-10's test images and writes one results file,
rewritten after every robust cell (``--resume`` continues it); ``--merge`` combines copies that separate
processes filled in. Every figure names its threat model, attack, epsilon, steps, batch size and policy.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import load_cifar10, to_float
from ..io import load_model
from ..policy import parse_policy
from ..progress import shows_progress
from .evidence import drift_evidence
from .grid import evaluate_model, evaluation_images
from .plan import GRIDS, CellFilter
from .shift_cli import add_shift_arguments, run_shift
from .store import (
    RESULTS_FORMAT,
    calibration_digest,
    card_digest,
    merge_devices,
    merge_results,
    resumable,
    write_results,
)
from .threats import GRADIENTS, parse_threat

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _parsed(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` that reports ``parse``'s ``ValueError`` as a usage error."""

    def parse_argument(text: str) -> T:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``evaluate`` options on ``parser``."""
    parser.add_argument("--models", nargs="+", default=["cifar10-resnet20-bn", "cifar10-resnet20-robustnorm"],
                        help="bundled model names or model directories")
    parser.add_argument("--data", default=None,
                        help="CIFAR-10 folder with train.tar.gz and test.tar.gz, as described in docs/data.md "
                        "(default: $ROBUSTNORM_CIFAR10)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="core",
                        help="core: the full grid; smoke: a tiny one for quick CPU checks")
    parser.add_argument("--robust-images", type=int, default=2000,
                        help="fixed, class-balanced test subset for attacks (default 2000)")
    parser.add_argument("--test-images", type=int, default=10000, help="test images for clean accuracy")
    parser.add_argument("--device", default=None, help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets, threat models and attacks")
    parser.add_argument("--sections", nargs="+", choices=("grid", "drift", "shift"), default=["grid", "drift"],
                        help="the accuracy grid, the drift evidence, and/or the shift grid (corruptions, written to "
                        "--shift-out)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness/robustness.json"),
                        help="results JSON (default: benchmarks/results/robustness/robustness.json)")
    parser.add_argument("--max-cell-images", type=int, default=None, metavar="N",
                        help="leave out cells whose attack runs more than N images per step (e.g. 20000 on a CPU: "
                        "lone attackers at large n); fill them in later with --resume")
    parser.add_argument("--only-sizes", type=int, nargs="+", metavar="N",
                        help="run only the robust cells of these batch sizes (the rest later, with --resume)")
    parser.add_argument("--only-threats", type=_parsed(parse_threat), nargs="+", metavar="THREAT",
                        help="run only the robust cells of these threat models, e.g. whole lone fraction:0.1")
    parser.add_argument("--only-gradients", nargs="+", choices=GRADIENTS, metavar="GRADIENT",
                        help=f"run only the robust cells of these gradients ({', '.join(GRADIENTS)})")
    parser.add_argument("--only-eps", type=float, nargs="+", metavar="EPS_255",
                        help="run only the robust cells of these eps, in 1/255 (e.g. 2)")
    parser.add_argument("--only-policies", type=_parsed(parse_policy), nargs="+", metavar="POLICY",
                        help="run only the robust cells of these policies, e.g. batch blend:512 (two processes on "
                        "two copies of --out can then share a model's cells; --merge them afterwards)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="COPY",
                        help="run nothing: add to --out the robust cells that runs on copies of it wrote")
    parser.add_argument("--resume", action="store_true",
                        help="keep what --out already holds for the same models, data and grid, and run only the "
                        "rest (the file is rewritten after every robust cell)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (they are drawn only on a terminal, and never when CI is set)")
    add_shift_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Evaluate as ``args`` say (see :func:`add_arguments`); returns the process exit status."""
    if args.merge:
        merged = json.loads(args.out.read_text())
        for path in args.merge:
            logger.info("%s: %d cells added from %s", args.out, merge_results(merged, json.loads(path.read_text())),
                        path)
        write_results(args.out, merged)
        return 0
    progress = shows_progress(False if args.quiet else None)
    with logging_redirect_tqdm() if progress else nullcontext():  # log lines above the bars, not through them
        if "shift" in args.sections:
            run_shift(args, progress)
        if not {"grid", "drift"} & set(args.sections):
            return 0
        _evaluate(args, progress)
    print(f"wrote {args.out}")
    return 0


def _evaluate(args: argparse.Namespace, progress: bool) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    test, robust_index = evaluation_images(load_cifar10("test", args.data), args.test_images, args.robust_images,
                                           args.seed)
    test = test.to(device)
    test_x01 = to_float(test.images)
    robust_x01, robust_labels = test_x01[robust_index.to(device)], test.labels[robust_index.to(device)]
    # clean batchmates for the lone attacker, fractions and poisoning: the test images outside the subset
    outside = torch.ones(len(test), dtype=torch.bool)
    outside[robust_index] = False
    pool_index = outside.nonzero().squeeze(1).to(device)
    pool_x01, pool_labels = test_x01[pool_index], test.labels[pool_index]
    grid = GRIDS[args.grid]
    report = {"format": RESULTS_FORMAT, "dataset": "CIFAR-10 (JPEG q75) test", "grid": args.grid,
              "grid_spec": asdict(grid), "device": f"{device} (torch {torch.__version__})", "torch": torch.__version__,
              "seed": args.seed,
              "robust_images": int(robust_index.numel()), "test_images": len(test), "models": []}
    earlier = resumable(args.out, report) if args.resume else None
    if earlier is not None and earlier["models"]:  # keep every earlier model entry and where it ran; those run
        report["models"] = earlier["models"]  # again are replaced in place
        report["device"] = merge_devices(earlier["device"], report["device"])
    only = CellFilter(args.only_sizes or (), args.only_threats or (), args.only_gradients or (), args.only_eps or (),
                      args.only_policies or ())
    for name in args.models:
        model, card = load_model(name, device=device)
        started = time.perf_counter()
        result = {"model": card.name, "version": card.version, "policy": card.policy, "p": card.p,
                  "card_digest": card_digest(card)}
        index = next((i for i, entry in enumerate(report["models"]) if entry["model"] == card.name), None)
        previous = report["models"][index] if index is not None else {}
        if previous.get("card_digest") != result["card_digest"]:
            previous = {}  # other weights or policy: nothing earlier applies
        if previous.get("drift", {}).get("calibration_digest") != calibration_digest(card):
            previous.pop("drift", None)  # drift scores read the card's drift calibration
        result.update({key: value for key, value in previous.items() if key not in result})
        if index is None:
            report["models"].append(result)
        else:
            report["models"][index] = result
        spent = previous.get("seconds", 0.0)

        def save(partial: dict, into: dict = result, since: float = started, before: float = spent) -> None:
            into.update(partial)
            into["seconds"] = round(time.perf_counter() - since + before, 1)
            write_results(args.out, report)

        if "grid" in args.sections:
            result.update(evaluate_model(model, card, test_x01, test.labels, robust_x01, robust_labels, grid,
                                         args.seed, pool=pool_x01, pool_labels=pool_labels, previous=previous,
                                         on_progress=save, max_cell_images=args.max_cell_images, only=only,
                                         progress=progress))
        if "drift" in args.sections and "drift" not in result:
            result["drift"] = drift_evidence(model, card, robust_x01, robust_labels, steps=grid.steps, seed=args.seed)
            result["drift"]["calibration_digest"] = calibration_digest(card)
        save({})
