"""``robustnorm calibrate``: choose a model's MIN_BATCH, N0 and drift calibrations from measurements.

All measurements use the validation split held out from the training images (5,000 of CIFAR-10's 50,000
training images, fixed seed), never the test set:

1. clean accuracy for batches of n = 1, 2, 4, ..., 256 under ``frozen``, ``batch`` and ``blend:N0`` for
   several N0;
2. N0 (BatchNorm models): the prior strength whose ``blend`` is most accurate on average over the small
   batches (n < 32), the sizes where the fallback runs;
3. MIN_BATCH: the smallest n from which ``batch`` is at least as accurate as the fallback (``frozen`` for
   RobustNorm models, ``blend:N0`` for BatchNorm models) at that n and every larger n measured; if there is
   none, the policy is the fallback itself;
4. the drift calibration (:func:`robustnorm.calibrate_drift`) with the chosen policy, or with the policy
   ``--policy`` names instead (the measurements still record the choice): drift scores are only meaningful
   under the statistics they were calibrated with, so a model served under another policy is calibrated for it.
The card's policy string, its ``calibration`` and ``evaluation["calibration"]`` (the measurements) are
written with :func:`robustnorm.save_model`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from .data import cifar10_train_val, normalize, to_float
from .drift import DEFAULT_CALIBRATION_SIZES, calibrate_drift
from .io import ModelCard, load_model, model_directory, save_model
from .policy import parse_policy
from .progress import progress_bar, shows_progress
from .scoring import accuracy

logger = logging.getLogger(__name__)

N0_CANDIDATES = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0)  # 1024: nearly frozen
SMALL_BATCH = 32


def choose_policy(table: dict[str, dict[int, float]], robust: bool) -> tuple[str, float | None, int | None]:
    """``(policy, n0, min_batch)`` from validation accuracies ``table[policy][n]`` (see module docstring)."""
    sizes = sorted(table["batch"])
    n0 = None
    fallback = "frozen"
    if not robust:
        small = [n for n in sizes if n < SMALL_BATCH]
        blends = [policy for policy in table if policy.startswith("blend:")]
        best = max(blends, key=lambda policy: (sum(table[policy][n] for n in small) / len(small),
                                               -float(policy.split(":")[1])))
        n0, fallback = float(best.split(":")[1]), best
    min_batch = None
    for i, n in enumerate(sizes):
        if all(table["batch"][m] >= table[fallback][m] for m in sizes[i:]):
            min_batch = n
            break
    if min_batch is None:
        return fallback, n0, None
    if robust:
        return f"adaptive:{min_batch}", n0, min_batch
    return f"adaptive:{min_batch}:{fallback}", n0, min_batch


def calibrate(model: nn.Module, card: ModelCard, val_x01: torch.Tensor, val_labels: torch.Tensor,
              sizes: tuple[int, ...] = DEFAULT_CALIBRATION_SIZES,
              n0_candidates: tuple[float, ...] = N0_CANDIDATES, batches_per_size: int = 64,
              policy: str | None = None, progress: bool | None = False) -> ModelCard:
    """Measure, choose and record policy, N0 and drift calibration in ``card`` (returned); ``policy``, when
    given, is deployed and drift-calibrated instead of the measured choice. ``progress``: a bar over the
    accuracy measurements (:func:`robustnorm.progress.progress_bar`)."""
    forced = None if policy is None else str(parse_policy(policy))  # a bad policy fails before the measurements
    robust = card.norm == "robustnorm"
    # RobustNorm models fall back to frozen (their tracked statistics): N0 is a BatchNorm-only choice.
    policies = ["frozen", "batch"] + ([] if robust else [f"blend:{n0:g}" for n0 in n0_candidates])
    table: dict[str, dict[int, float]] = {name: {} for name in policies}
    with progress_bar(total=len(policies) * len(sizes), desc="accuracy", unit="setting", enabled=progress) as bar:
        for name in policies:
            for n in sizes:
                table[name][n] = accuracy(model, card, val_x01, val_labels, name, n)
                bar.update()
    chosen, n0, min_batch = choose_policy(table, robust)
    logger.info("chose policy %s (N0=%s, MIN_BATCH=%s)", chosen, n0, min_batch)
    deployed = forced or chosen
    if deployed != chosen:
        logger.info("deploying %s as asked instead, with drift calibrated under it", deployed)
    card.policy = deployed
    normalized = normalize(val_x01, card.mean, card.std)
    card.calibration = calibrate_drift(model, normalized, batch_sizes=sizes, batches_per_size=batches_per_size,
                                       policy=deployed)
    card.evaluation["calibration"] = {
        "split": f"validation ({val_x01.shape[0]} images held out from training)",
        "n0": n0, "min_batch": min_batch, "policy": chosen,
        **({"deployed_policy": deployed} if deployed != chosen else {}),
        "accuracy": {name: {str(n): round(value, 4) for n, value in row.items()} for name, row in table.items()},
    }
    return card


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="bundled model name or model directory")
    parser.add_argument("--out", type=Path, default=None, help="directory to write (default: the model's own)")
    parser.add_argument("--data", default=None,
                        help="CIFAR-10 folder with train.tar.gz and test.tar.gz, as described in docs/data.md "
                        "(default: $ROBUSTNORM_CIFAR10)")
    parser.add_argument("--val-images", type=int, default=5000, help="validation images to use (default all 5000)")
    parser.add_argument("--batches-per-size", type=int, default=64, help="clean batches per size for drift")
    parser.add_argument("--policy", default=None,
                        help="deploy this policy (e.g. adaptive:16) instead of the measured choice, with the drift "
                             "scores calibrated under it (the service scores drift only under the card's policy)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-shift", action="store_true",
                        help="skip the choice under shift (robustnorm.calibrate_shift: auto policies and their drift "
                             "gate, scored on single-image streams of the 4 validation corruptions)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it is drawn only on a terminal, and never when CI is set)")


def run(args: argparse.Namespace) -> int:
    model, card = load_model(args.model, device=args.device)
    _, val = cifar10_train_val(args.data)
    val = val.subset(torch.arange(min(args.val_images, len(val)))).to(args.device)
    card = calibrate(model, card, to_float(val.images), val.labels, batches_per_size=args.batches_per_size,
                     policy=args.policy, progress=shows_progress(False if args.quiet else None))
    if args.policy is None and not args.no_shift:
        from .calibrate_shift import calibrate_shift

        card = calibrate_shift(model, card, to_float(val.images), val.labels)
    out = args.out or model_directory(args.model)
    save_model(model, card, out)
    print(f"policy {card.policy}; wrote {out}")
    return 0
