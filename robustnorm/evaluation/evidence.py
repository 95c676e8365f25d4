"""Drift evidence: does the drift score tell shifted batches from clean ones, under the card's policy?

:func:`drift_evidence` runs clean batches, adversarial batches (PGD through the deployed model, whole batch and
lone attacker) and corrupted batches (every corruption of :mod:`robustnorm.corruptions`, at one severity)
through the model with the card's policy, and reports each layer's mean drift per condition and the ROC AUC of
the batch and image scores, clean against each condition (the scores read the card's drift calibration; without
one the AUCs are ``None``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..corruptions import CORRUPTIONS, corrupt
from ..data import make_generator, normalize
from ..drift import MEASURES, drift_report
from ..grouping import batch_groups
from ..io import ModelCard
from ..policy import parse_policy
from ..scoring import chunks
from .cells import Cell
from .craft import craft
from .threats import LONE, WHOLE


def roc_auc(negatives: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of a score separating ``positives`` (shifted) from ``negatives`` (clean):
    the probability that a random positive scores above a random negative (ties count one half)."""
    negatives, positives = negatives.double().flatten(), positives.double().flatten()
    above = (positives[:, None] > negatives[None, :]).double().mean()
    ties = (positives[:, None] == negatives[None, :]).double().mean()
    return float(above + 0.5 * ties)


@torch.no_grad()
def _drift_of(model: nn.Module, card: ModelCard, x01: Tensor, n: int) -> tuple[dict, Tensor, Tensor]:
    """Per-layer mean of each measure over batches, the batch scores and the image scores."""
    policy = parse_policy(card.policy)
    layers: dict[str, dict[str, list[float]]] = {}
    batch_scores, image_scores = [], []
    for part in chunks(x01.shape[0], n):
        with batch_groups(model, [n] * ((part.stop - part.start) // n), policy=policy, record=True) as run:
            model(normalize(x01[part], card.mean, card.std))
        report = drift_report(run, card.calibration)
        for name, values in report.layers.items():
            for measure in MEASURES:
                layers.setdefault(name, {}).setdefault(measure, []).extend(values[measure])
        batch_scores += [float("nan") if v is None else v for v in report.batch_score]
        image_scores += report.image_score or [float("nan")] * (part.stop - part.start)
    means = {name: {m: sum(v) / len(v) for m, v in measures.items()} for name, measures in layers.items()}
    return means, torch.tensor(batch_scores), torch.tensor(image_scores)


def drift_evidence(model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, n: int = 32,
                   eps_255: float = 8, steps: int = 20, severity: int = 3, seed: int = 0) -> dict:
    """Per-layer drift and ROC AUC of the batch and image scores, clean against adversarial and corrupted
    batches of ``n`` (module docstring); JSON-ready."""
    usable = x01.shape[0] - x01.shape[0] % n
    x01, labels = x01[:usable], labels[:usable]
    generator = make_generator(seed, n)
    shifted: dict[str, tuple[Tensor, Tensor | None]] = {}
    for threat in (WHOLE, LONE):
        cell = Cell(parse_policy(card.policy), n, threat, "pgd", eps_255, "adaptive")
        crafted = craft(model, card, x01, labels, cell, steps=steps, generator=generator)
        shifted[f"pgd_{threat}"] = (crafted.images, crafted.mask)
    for name in CORRUPTIONS:
        shifted[name] = (corrupt(name, x01, severity, generator=make_generator(seed, 7)), None)
    clean_layers, clean_batch, clean_image = _drift_of(model, card, x01, n)
    result = {"n": n, "eps_255": round(float(eps_255), 3), "steps": steps, "severity": severity, "policy": card.policy,
              "images": usable, "layers": {"clean": clean_layers}, "auc": {}}
    for condition, (images, mask) in shifted.items():
        layers, batch_scores, image_scores = _drift_of(model, card, images, n)
        result["layers"][condition] = layers
        positives = image_scores[mask.cpu()] if mask is not None else image_scores
        result["auc"][condition] = {
            "batch_score": roc_auc(clean_batch, batch_scores) if card.calibration is not None else None,
            "image_score": roc_auc(clean_image, positives) if card.calibration is not None else None,
            "mean_batch_score": float(batch_scores.mean()), "clean_mean_batch_score": float(clean_batch.mean()),
        }
    return result
