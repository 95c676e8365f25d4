"""What a card's drift calibration says about clean traffic run under policies other than the card's own.

A card's batch score is calibrated under the card's policy (and the image score under ``frozen``), so clean
batches score about 0 and about 1% of clean images score above 1 there. This runs clean CIFAR-10 test batches of
each size under several policies, scores them with the card's calibration regardless, and writes the median batch
score and the share of images above 1: the measurement behind the service's rule of scoring drift only under the
card's policy.

    python benchmarks/drift_policy_probe.py --out benchmarks/results/drift_policy_probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import robustnorm
from robustnorm.data import balanced_subset, load_cifar10, make_generator, normalize, to_float


@torch.no_grad()
def clean_scores(model: torch.nn.Module, card: robustnorm.ModelCard, x01: torch.Tensor, policy: str,
                 n: int) -> dict:
    """Median batch score and share of image scores above 1 for consecutive batches of ``n`` clean images."""
    robustnorm.set_policy(model, policy)
    usable = x01.shape[0] - x01.shape[0] % n
    with robustnorm.batch_groups(model, [n] * (usable // n), record=True) as run:
        model(normalize(x01[:usable], card.mean, card.std))
    report = robustnorm.drift_report(run, card.calibration)
    batch = [score for score in report.batch_score if score is not None]
    images = report.image_score or []
    return {"batches": len(batch), "median_batch_score": round(statistics.median(batch), 3),
            "images_above_1": round(sum(score > 1 for score in images) / len(images), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=robustnorm.list_models())
    parser.add_argument("--policies", nargs="+", default=["frozen", "batch", "adaptive:16"],
                        help="policies besides each card's own")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--images", type=int, default=1024, help="class-balanced clean test images")
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drift_policy_probe.json"))
    args = parser.parse_args()
    test = load_cifar10("test", args.data)
    test = test.subset(balanced_subset(test.labels, args.images // len(test.classes) + 1, seed=11))
    x01 = to_float(test.images[torch.randperm(len(test), generator=make_generator(11))[: args.images]])
    result = {"images": x01.shape[0], "sizes": args.sizes, "models": []}
    for name in args.models:
        model, card = robustnorm.load_model(name)
        policies = [card.policy] + [policy for policy in args.policies if policy != card.policy]
        rows = {policy: {str(n): clean_scores(model, card, x01, policy, n) for n in args.sizes} for policy in policies}
        result["models"].append({"model": card.name, "version": card.version, "card_policy": card.policy,
                                 "policies": rows})
        for policy, by_size in rows.items():
            print(f"{card.name} {policy}: " + ", ".join(
                f"n={n} median {row['median_batch_score']:+.2f}, {100 * row['images_above_1']:.1f}% images > 1"
                for n, row in by_size.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
