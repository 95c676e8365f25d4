"""Cross-check the project's PGD against IBM's Adversarial Robustness Toolbox (ART) on the same images.

Max/min gradients (RobustNorm's range) can mask a weak attack, so the project's own PGD must be shown not to
be weaker than a maintained, independent implementation. Both attack the whole batch (every image of each
batch of n adversarial), with the gradient taken through the model as deployed: ART's PyTorchClassifier runs
the model in eval mode on batches of ``batch_size = n``, so under ``batch`` its gradient also flows through
the batch statistics. Both use PGD-20, step eps/4, one random start; predictions are taken in the same
batches of n under the same policy.

    python benchmarks/crosscheck_art.py --models cifar10-resnet20-bn cifar10-resnet20-robustnorm \
        --images 2000 --out benchmarks/results/robustness/crosscheck_art.json

Needs ``pip install adversarial-robustness-toolbox`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from art.attacks.evasion import ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier

import robustnorm
from robustnorm.data import load_cifar10, to_float
from robustnorm.evaluation.cells import Cell
from robustnorm.evaluation.grid import evaluation_images
from robustnorm.evaluation.run import run_cell
from robustnorm.runtime import retain_freed_memory
from robustnorm.scoring import predictions


def art_robust_accuracy(model: torch.nn.Module, card: robustnorm.ModelCard, x01: torch.Tensor, labels: torch.Tensor,
                        policy: str, n: int, eps: float, steps: int, device: torch.device) -> float:
    robustnorm.set_policy(model, policy)
    classifier = PyTorchClassifier(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(card.input_size),
        nb_classes=card.num_classes, clip_values=(0.0, 1.0),
        preprocessing=(np.array(card.mean).reshape(3, 1, 1), np.array(card.std).reshape(3, 1, 1)),
        device_type="gpu" if device.type == "cuda" else "cpu")
    attack = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=eps / 4, max_iter=steps,
                                      num_random_init=1, batch_size=n, verbose=False)
    adversarial = attack.generate(x=x01.cpu().numpy(), y=labels.cpu().numpy())
    adversarial01 = torch.from_numpy(adversarial).to(device)
    return float((predictions(model, card, adversarial01, policy, n) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cifar10-resnet20-bn", "cifar10-resnet20-robustnorm"])
    parser.add_argument("--policies", nargs="+", default=["frozen", "batch"])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--eps-255", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--data", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness/crosscheck_art.json"))
    args = parser.parse_args()
    retain_freed_memory()
    device = torch.device(args.device)
    # The grid's own robust subset (robustnorm evaluate, seed 0), so the figures sit beside its whole-batch cells.
    test, robust = evaluation_images(load_cifar10("test", args.data), 10_000, args.images, seed=0)
    subset = test.subset(robust).to(device)
    x01, labels = to_float(subset.images), subset.labels
    usable = x01.shape[0] - x01.shape[0] % args.n
    x01, labels = x01[:usable], labels[:usable]
    rows = []
    for name in args.models:
        model, card = robustnorm.load_model(name, device=device)
        for policy in args.policies:
            for eps_255 in args.eps_255:
                started = time.perf_counter()
                cell = Cell.parse(policy, args.n, "whole", "pgd", eps_255, "adaptive")
                ours = run_cell(model, card, x01, labels, cell, steps=args.steps)
                art_accuracy = art_robust_accuracy(model, card, x01, labels, policy, args.n, eps_255 / 255,
                                                   args.steps, device)
                rows.append({"model": name, "version": card.version, "policy": policy, "n": args.n,
                             "eps_255": eps_255, "steps": args.steps, "images": usable,
                             "clean_accuracy": ours.clean_accuracy,
                             "robustnorm_pgd_accuracy": ours.robust_accuracy, "art_pgd_accuracy": art_accuracy,
                             "ours_not_weaker": ours.robust_accuracy <= art_accuracy + 0.01,
                             "seconds": round(time.perf_counter() - started, 1)})
                print(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threat": "whole", "attack": "PGD, step eps/4, 1 random start",
                                    "images": "the first images of robustnorm evaluate's fixed robust subset (seed 0)",
                                    "device": f"{device} (torch {torch.__version__})", "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
