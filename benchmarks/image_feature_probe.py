"""Why the per-image drift score misses noise and adversarial images, and what other early features would see.

For each bundled model, each image's own features at the inputs of the first three norm layers (``frozen``
statistics, as the image score is calibrated) are compared between clean test images and shifted ones: PGD-20 at
8/255 through the deployed policy (whole batches of 32 and the lone attacker's image) and the project's four
corruptions at severity 3. Per image and channel, over (H, W):

- ``mean`` and ``log_var``: the channel mean and log variance (the shipped score uses the layer's own spread,
  which is the range on RobustNorm layers);
- ``log_roughness``: ``log(d / v)``, ``d`` the mean squared difference between neighbouring positions (rows and
  columns), ``v`` the variance: how much of the channel's variation is high-frequency, whatever its scale;
- ``pixel_log_hf``: ``log d`` on the input pixels themselves, per colour channel.

Each feature set is scored as the shipped score is, ``mean_d ((f_d - mu_d) / sigma_d)^2`` with ``mu``, ``sigma``
from validation images (held out from training), and the ROC AUC says how well it separates shifted test images
from clean ones (``deployed`` is the card's own image score, for reference). ``paired_shift`` says how far a
perturbation moves each image's own features, in units of how much the features vary between clean images (the
median over images of ``mean_d |f_d(shifted) - f_d(clean)| / sigma_d``): when that is small, no per-image score
built on those features can separate the two.

    python benchmarks/image_feature_probe.py --out benchmarks/results/image_feature_probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn

import robustnorm
from robustnorm.corruptions import CORRUPTIONS, corrupt
from robustnorm.data import balanced_subset, cifar10_train_val, load_cifar10, make_generator, normalize, to_float
from robustnorm.drift import IMAGE_SCORE_LAYERS
from robustnorm.evaluation.cells import Cell
from robustnorm.evaluation.craft import craft
from robustnorm.evaluation.evidence import roc_auc
from robustnorm.layers import policy_layers, set_policy

FEATURE_SETS = {
    "mean+log_var": ("mean", "log_var"),
    "log_roughness": ("log_roughness",),
    "mean+log_var+log_roughness": ("mean", "log_var", "log_roughness"),
    "pixel_log_hf": ("pixel_log_hf",),
}
_EPS = 1e-5


def _neighbour_energy(x: Tensor) -> Tensor:
    """Mean squared difference between vertically and horizontally neighbouring positions, (N, C)."""
    rows = (x[:, :, 1:, :] - x[:, :, :-1, :]).square().mean(dim=(2, 3))
    columns = (x[:, :, :, 1:] - x[:, :, :, :-1]).square().mean(dim=(2, 3))
    return (rows + columns) / 2


@torch.no_grad()
def features(model: nn.Module, card: robustnorm.ModelCard, x01: Tensor, chunk: int = 512) -> dict[str, Tensor]:
    """Each image's features, name -> (N, D), under ``frozen`` statistics (the policy is restored)."""
    seen: list[tuple[Tensor, Tensor, Tensor]] = []

    def record(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].float()
        variance = x.var(dim=(2, 3), unbiased=False)
        seen.append((x.mean(dim=(2, 3)), torch.log(variance + _EPS),
                     torch.log(_neighbour_energy(x) + _EPS) - torch.log(variance + _EPS)))

    layers = [layer for _, layer in policy_layers(model)][:IMAGE_SCORE_LAYERS]
    hooks = [layer.register_forward_pre_hook(record) for layer in layers]
    original = layers[0].policy
    set_policy(model, "frozen")
    parts: dict[str, list[Tensor]] = {"mean": [], "log_var": [], "log_roughness": []}
    try:
        for start in range(0, x01.shape[0], chunk):
            seen.clear()
            model(normalize(x01[start:start + chunk], card.mean, card.std))
            for i, name in enumerate(parts):
                parts[name].append(torch.cat([layer_features[i] for layer_features in seen], dim=1))
    finally:
        for hook in hooks:
            hook.remove()
        set_policy(model, original)
    result = {name: torch.cat(values) for name, values in parts.items()}
    result["pixel_log_hf"] = torch.log(_neighbour_energy(x01.float()) + _EPS)
    return result


def _stack(values: dict[str, Tensor], names: tuple[str, ...]) -> Tensor:
    return torch.cat([values[name] for name in names], dim=1)


@torch.no_grad()
def deployed_scores(model: nn.Module, card: robustnorm.ModelCard, x01: Tensor, chunk: int = 512) -> Tensor:
    """The card's own image score (the service's ``drift score``), under ``frozen`` statistics."""
    original = policy_layers(model)[0][1].policy
    set_policy(model, "frozen")
    scores = []
    try:
        for start in range(0, x01.shape[0], chunk):
            with robustnorm.batch_groups(model, record=True) as run:
                model(normalize(x01[start:start + chunk], card.mean, card.std))
            scores += robustnorm.drift_report(run, card.calibration).image_score or []
    finally:
        set_policy(model, original)
    return torch.tensor(scores)


def probe(name: str, test_x01: Tensor, test_labels: Tensor, val_x01: Tensor, n: int, eps: float, steps: int,
          seed: int) -> dict:
    model, card = robustnorm.load_model(name)
    calibration = features(model, card, val_x01)
    stacked = {key: _stack(calibration, names) for key, names in FEATURE_SETS.items()}
    centre = {key: (value.mean(dim=0), value.std(dim=0).clamp_min(1e-6)) for key, value in stacked.items()}
    spread = {key: value.std(dim=0).clamp_min(1e-6) for key, value in calibration.items()}

    def score(values: dict[str, Tensor], key: str) -> Tensor:
        mean, std = centre[key]
        return ((_stack(values, FEATURE_SETS[key]) - mean) / std).square().mean(dim=1)

    clean = features(model, card, test_x01)
    clean_deployed = deployed_scores(model, card, test_x01)
    generator = make_generator(seed, n)
    shifted: dict[str, tuple[Tensor, Tensor | None]] = {}
    for threat in ("whole", "lone"):
        cell = Cell.parse(card.policy, n, threat, "pgd", eps * 255, "adaptive")
        crafted = craft(model, card, test_x01, test_labels, cell, steps=steps, generator=generator)
        shifted[f"pgd_{threat}"] = (crafted.images, crafted.mask.cpu())
    for corruption in CORRUPTIONS:
        shifted[corruption] = (corrupt(corruption, test_x01, 3, generator=make_generator(seed, 7)), None)
    result: dict = {"model": card.name, "version": card.version, "policy": card.policy, "auc": {},
                    "paired_shift": {}}
    for condition, (images, mask) in shifted.items():
        values = features(model, card, images)
        keep = mask if mask is not None else torch.ones(images.shape[0], dtype=torch.bool)
        aucs = {"deployed": roc_auc(clean_deployed, deployed_scores(model, card, images)[keep])}
        aucs.update({key: roc_auc(score(clean, key), score(values, key)[keep]) for key in FEATURE_SETS})
        result["auc"][condition] = {key: round(value, 3) for key, value in aucs.items()}
        result["paired_shift"][condition] = {
            key: round(float(((values[key][keep] - clean[key][keep]).abs() / spread[key]).mean(dim=1).median()), 3)
            for key in clean}
        print(f"{card.name} {condition}: " + " ".join(f"{k}={v:.3f}" for k, v in result["auc"][condition].items()),
              flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=robustnorm.list_models())
    parser.add_argument("--images", type=int, default=1024, help="class-balanced test images (a multiple of --n)")
    parser.add_argument("--calibration-images", type=int, default=2000, help="validation images for mu, sigma")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--eps-255", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/image_feature_probe.json"))
    args = parser.parse_args()
    if args.images % args.n:
        parser.error(f"--images ({args.images}) must be a multiple of --n ({args.n})")
    test = load_cifar10("test", args.data)
    test = test.subset(balanced_subset(test.labels, args.images // len(test.classes) + 1, seed=args.seed + 5))
    test = test.subset(torch.randperm(len(test), generator=make_generator(args.seed))[: args.images])
    _, validation = cifar10_train_val(args.data)
    val_x01 = to_float(validation.images[: args.calibration_images])
    result = {"images": args.images, "calibration_images": val_x01.shape[0], "n": args.n, "eps_255": args.eps_255,
              "steps": args.steps, "severity": 3, "layers": IMAGE_SCORE_LAYERS, "models": []}
    for name in args.models:
        result["models"].append(probe(name, to_float(test.images), test.labels, val_x01, args.n,
                                      args.eps_255 / 255, args.steps, args.seed))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
