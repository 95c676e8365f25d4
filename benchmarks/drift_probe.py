"""How the batch and per-image drift scores react to noise on a bundled model (offline, through the library).

Runs one batch of clean CIFAR-10 test images and one batch of uniform-noise images through the model under its
card's policy, with recording on, and writes both scores per batch and per image.

    python benchmarks/drift_probe.py --model cifar10-resnet20-robustnorm --out benchmarks/results/drift_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import robustnorm
from robustnorm.data import balanced_subset, load_cifar10, make_generator, normalize, to_float


def scores(model: torch.nn.Module, card: robustnorm.ModelCard, x01: torch.Tensor) -> dict:
    with torch.no_grad(), robustnorm.batch_groups(model, [x01.shape[0]], record=True) as run:
        model(normalize(x01, card.mean, card.std))
    report = robustnorm.drift_report(run, card.calibration)
    return {"statistics": run.ran[0], "batch_score": report.batch_score[0],
            "image_scores": [round(s, 4) for s in report.image_score or []],
            "mean_kl": report.raw_batch[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=robustnorm.list_models()[0] if robustnorm.list_models() else None)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/drift_probe.json"))
    args = parser.parse_args()
    model, card = robustnorm.load_model(args.model)
    test = load_cifar10("test", args.data)
    clean = to_float(test.subset(balanced_subset(test.labels, 2, seed=3)[: args.n]).images)
    noise = torch.rand(clean.shape, generator=make_generator(3))
    result = {"model": card.name, "version": card.version, "policy": card.policy, "n": args.n,
              "clean": scores(model, card, clean), "uniform_noise": scores(model, card, noise)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name in ("clean", "uniform_noise"):
        images, batch = result[name]["image_scores"], result[name]["batch_score"]
        print(f"{name}: batch score {batch:.2f}, image scores {min(images):.3f}..{max(images):.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
