"""Choosing the default policy under shift: which ``auto`` setting (or ``frozen``) a model card recommends.

The objective, on CIFAR-10's validation split only (never the test images, never the 15 test corruptions):
among the candidates that cost at most ``clean_cost`` points on clean single-image traffic and at most
``skew_cost`` points on label-skewed clean traffic (runs of one or two classes) against ``frozen``, take the one
with the highest mean accuracy on single-image streams of the 4 validation corruptions (speckle noise,
gaussian blur, spatter, saturate; severity ``severity``), counted after each stream's first ``window`` images.
``frozen`` is always a candidate, so a model for which adaptation never pays keeps its population statistics.

Each candidate ``auto:WINDOW:N0`` comes with its drift gate (:func:`robustnorm.gate.calibrate_gate`), fitted on
one part of the validation images with the gate margin ``margin``; the streams use the other part. Streams run
the library as the service does: one image per step and stream, through one :class:`robustnorm.StreamStore`
(the streams advance together as groups of one image in a forward, which grouped statistics keep apart). All
streams are as long as the shortest (the label-skewed one: runs of ``skew_run`` images).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .evaluation.streams import stream_predictions
from .gate import GateCalibration, calibrate_gate
from .io import ModelCard
from .policy import parse_policy

logger = logging.getLogger(__name__)

DEFAULT_WINDOWS = (256,)
DEFAULT_N0 = (64, 256, 1024)
DEFAULT_MARGINS = (1.1, 1.25)


@dataclass
class Candidate:
    """One setting and how its streams scored (accuracy in %)."""

    policy: str
    margin: float | None
    clean: float = 0.0
    skew: float = 0.0
    shifted: dict[str, float] = field(default_factory=dict)
    gate: GateCalibration | None = field(default=None, repr=False)

    @property
    def shifted_mean(self) -> float:
        return sum(self.shifted.values()) / len(self.shifted) if self.shifted else 0.0

    def row(self) -> dict:
        return {"policy": self.policy, "margin": self.margin, "clean": self.clean, "skew": self.skew,
                "shifted": self.shifted, "shifted_mean": self.shifted_mean}


def stream_accuracies(model: nn.Module, streams: dict[str, tuple[Tensor, Tensor, int]], policy: str,
                      gate: GateCalibration | None) -> dict[str, float]:
    """Accuracy (%) of single images through one fresh stream per entry ``name -> (images, labels, warm)``,
    counted after the first ``warm`` images. The streams advance together, one image each per forward, as
    groups of one (:func:`robustnorm.evaluation.streams.stream_predictions`)."""
    predicted = stream_predictions(model, {name: images for name, (images, _, _) in streams.items()}, policy,
                                   gate=gate)
    scores = {}
    for name, (_, labels, warm) in streams.items():
        length = predicted[name].numel()
        hits = predicted[name][warm:] == labels[warm:length].to(predicted[name].device)
        scores[name] = 100.0 * int(hits.sum()) / max(1, length - warm)
    return scores


def skewed(labels: Tensor, run: int, generator: torch.Generator) -> Tensor:
    """Indices in runs of ``run`` images of one class, then of two classes, alternating."""
    pools = [torch.nonzero(labels == c).flatten() for c in range(int(labels.max()) + 1)]
    pools = [pool[torch.randperm(pool.numel(), generator=generator)] for pool in pools]
    order, k = [], 0
    while sum(pool.numel() for pool in pools) >= run:
        chosen = [k % len(pools)] if k % 2 == 0 else [k % len(pools), (k + 3) % len(pools)]
        take = [pools[c][: run // len(chosen)] for c in chosen]
        for c, part in zip(chosen, take):
            pools[c] = pools[c][part.numel():]
        merged = torch.cat(take)
        if merged.numel() == 0:
            break
        order.append(merged[torch.randperm(merged.numel(), generator=generator)])
        k += 1
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


def choose_policy(model: nn.Module, images: Tensor, labels: Tensor, shifted: dict[str, Tensor], *,
                  classes: int, windows: Sequence[int] = DEFAULT_WINDOWS, n0s: Sequence[float] = DEFAULT_N0,
                  margins: Sequence[float] = DEFAULT_MARGINS, clean_cost: float = 0.3, skew_cost: float = 1.0,
                  gate_images: int = 3000, skew_run: int = 200, seed: int = 0) -> tuple[Candidate, list[Candidate]]:
    """The chosen candidate and every candidate's scores.

    ``images`` are clean normalised validation images with their ``labels``; ``shifted`` maps each validation
    corruption to the same images corrupted (normalised). The first ``gate_images`` fit the gates; the rest
    make the streams.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    fit, rest = slice(0, gate_images), slice(gate_images, None)
    stream_images, stream_labels = images[rest], labels[rest]
    skew = skewed(stream_labels, skew_run, generator)
    candidates = [Candidate("frozen", None)]
    for window in windows:
        for margin in margins:
            gate = calibrate_gate(model, images[fit], labels[fit], window=window, classes=classes, margin=margin,
                                  seed=seed)
            candidates += [Candidate(f"auto:{window}:{n0:g}", margin, gate=gate) for n0 in n0s]
    for candidate in candidates:
        warm = parse_policy(candidate.policy).window or 0
        scores = stream_accuracies(model, {
            "clean": (stream_images, stream_labels, 0), "skew": (stream_images[skew], stream_labels[skew], 0),
            **{name: (corrupted[rest], stream_labels, warm) for name, corrupted in shifted.items()}},
            candidate.policy, candidate.gate)
        candidate.clean, candidate.skew = scores.pop("clean"), scores.pop("skew")
        candidate.shifted = scores
        logger.info("%s (gate margin %s): clean %.2f, skew %.2f, shifted %.2f", candidate.policy, candidate.margin,
                    candidate.clean, candidate.skew, candidate.shifted_mean)
    frozen = candidates[0]
    allowed = [c for c in candidates
               if c.clean >= frozen.clean - clean_cost and c.skew >= frozen.skew - skew_cost]
    chosen = max(allowed, key=lambda c: (c.shifted_mean, c is frozen))
    return chosen, candidates


def calibrate_shift(model: nn.Module, card: ModelCard, val_x01: Tensor, val_labels: Tensor, *,
                    severity: int = 5, seed: int = 0, **options: object) -> ModelCard:
    """Choose the card's policy under shift (see the module docstring) and record the measurements.

    When an ``auto`` candidate wins, the card gets it, its gate (``calibration.gate``) and a drift calibration
    made under ``frozen``, the statistics ``auto`` runs while its gate holds; when ``frozen`` wins, the card's
    policy is left as it was. ``card.evaluation["shift_calibration"]`` keeps every candidate's scores.
    """
    from .corruptions import VALIDATION_CORRUPTIONS, corrupt
    from .data import normalize
    from .drift import calibrate_drift

    normalized = normalize(val_x01, card.mean, card.std)
    shifted = {name: normalize(corrupt(name, val_x01, severity, seed + i), card.mean, card.std)
               for i, name in enumerate(VALIDATION_CORRUPTIONS)}
    chosen, candidates = choose_policy(model, normalized, val_labels, shifted, classes=len(card.labels), seed=seed,
                                       **options)  # type: ignore[arg-type]
    card.evaluation["shift_calibration"] = {
        "split": f"validation ({val_x01.shape[0]} images held out from training)",
        "corruptions": list(VALIDATION_CORRUPTIONS), "severity": severity, "chosen": chosen.row(),
        "objective": "highest mean accuracy on single-image streams of the validation corruptions, after the "
                     "first WINDOW images, among candidates within 0.3 points of frozen on clean and 1 point on "
                     "label-skewed single-image streams",
        "candidates": [candidate.row() for candidate in candidates]}
    if chosen.gate is None:
        logger.info("frozen wins under shift: the card keeps policy %s", card.policy)
        return card
    card.policy = chosen.policy
    card.calibration = calibrate_drift(model, normalized, batches_per_size=64, policy="frozen")
    card.calibration.gate = chosen.gate.to_dict()
    logger.info("chose %s (gate on %.3f, off %.3f)", chosen.policy, chosen.gate.on, chosen.gate.off)
    return card
