"""``robustnorm evaluate``: clean and robust accuracy per policy, batch size, threat model and attack.

Every figure names its threat model, attack, epsilon, steps, batch size and policy (ARCHITECTURE.md).
Many small batches run in one forward through grouped statistics, so small batch sizes stay cheap.

Threat models (the ``threat`` field):
- ``whole``: every image of the batch is adversarial (the paper's setting);
- ``lone``: one adversarial image among n - 1 clean ones (what a public service sees);
- ``fraction:F``: round(F * n) adversarial images per batch;
- ``poison:K``: K images per batch crafted to make the *other* n - K images misclassified.
Gradients (the ``gradient`` field): ``adaptive`` (through the model as deployed, real batch included),
``transfer`` (crafted against the ``frozen`` model, evaluated as deployed) and, for ``lone``, ``unknown``
(an attacker who does not know its batchmates: expectation over freshly drawn clean batchmates).
Each robust record also carries ``frozen_attack_accuracy``: the accuracy of the ``frozen`` model under the
same attack on the same images, so that gradient masking cannot pass for robustness.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import attacks
from .data import ImageDataset, balanced_subset, load_cifar10, make_generator, normalize, to_float
from .grouping import batch_groups
from .io import ModelCard, load_model
from .layers import set_policy
from .policy import parse_policy
from .scoring import accuracy, chunks, deployed_forward, predictions

logger = logging.getLogger(__name__)

ALL_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


# ----------------------------------------------------------------------------------------- forwards


def skewed_order(labels: Tensor, group_size: int, classes_per_batch: int, seed: int = 0) -> Tensor:
    """An index order in which every consecutive batch of ``group_size`` holds only ``classes_per_batch``
    classes (as a client's burst often does); images that cannot fill such a batch are left out."""
    generator = make_generator(seed, group_size, classes_per_batch)
    labels = labels.cpu()
    queues = {int(c): (labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=generator)]
              .tolist() for c in labels.unique()}
    shares = [group_size // classes_per_batch + (1 if i < group_size % classes_per_batch else 0)
              for i in range(classes_per_batch)]
    order: list[int] = []
    while True:
        ranked = sorted(queues, key=lambda c: (-len(queues[c]), float(torch.rand(1, generator=generator))))
        chosen = ranked[:classes_per_batch]
        if len(chosen) < classes_per_batch or any(len(queues[c]) < s for c, s in zip(chosen, shares)):
            return torch.tensor(order, dtype=torch.long)
        for c, share in zip(chosen, shares):
            order += queues[c][:share]
            del queues[c][:share]


# ----------------------------------------------------------------------------------------- attacks


@dataclass
class RobustRecord:
    model: str
    policy: str
    n: int
    threat: str
    attack: str
    eps: float
    eps_255: float
    steps: int
    gradient: str
    images: int  # in the attacked batches, attackers and clean batchmates together
    scored_images: int  # whose predictions robust_accuracy counts
    robust_accuracy: float  # on the attacker's images (poison: on the victims)
    clean_batchmates_accuracy: float | None  # accuracy of the untouched images of the same batches
    clean_accuracy: float  # same images, same policy and batch size, no attack
    frozen_attack_accuracy: float | None  # frozen model, same attack, same images (whole batch)
    seconds: float
    same_as: str | None = None  # the cell whose identical computation this one reuses (its policy; and gradient)


def _threat_masks(threat: str, groups: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    if threat == "whole":
        return torch.ones(groups * n, dtype=torch.bool), None
    if threat == "lone":
        return attacks.lone_attacker_mask(groups, n, generator), None
    if threat.startswith("fraction:"):
        return attacks.fraction_mask(groups, n, float(threat.split(":")[1]), generator), None
    if threat.startswith("poison:"):
        k = int(threat.split(":")[1])
        if k >= n:
            raise ValueError(f"poisoning with {k} attackers needs batches larger than {k}")
        mask = attacks.fraction_mask(groups, n, k / n, generator)
        return mask, ~mask
    raise ValueError(f"unknown threat model {threat!r}; use whole, lone, fraction:F or poison:K")


def _unknown_batchmates_sampler(model: nn.Module, card: ModelCard, policy: str, n: int, pool: Tensor,
                                groups: int) -> attacks.ForwardSampler:
    """EOT forward for a lone attacker who does not know its batchmates: each sample puts every attacker
    image first in a batch of ``n - 1`` freshly drawn clean pool images; returns the attackers' logits."""

    def sample(generator: torch.Generator | None) -> attacks.Forward:
        draw = torch.randint(0, pool.shape[0], (groups, n - 1), generator=generator).to(pool.device)

        def forward(attackers: Tensor) -> Tensor:
            batch = torch.cat([attackers.unsqueeze(1), pool[draw]], dim=1).flatten(0, 1)
            return deployed_forward(model, card, policy, n)(batch).view(groups, n, -1)[:, 0]

        return forward

    return sample


def _attackers_per_batch(threat: str, n: int) -> int:
    if threat == "whole":
        return n
    if threat == "lone":
        return 1
    if threat.startswith("fraction:"):
        return max(1, round(float(threat.split(":")[1]) * n))
    if threat.startswith("poison:"):
        return int(threat.split(":")[1])
    raise ValueError(f"unknown threat model {threat!r}; use whole, lone, fraction:F or poison:K")


def assemble_batches(x01: Tensor, labels: Tensor, pool: Tensor, pool_labels: Tensor, n: int, k: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batches of ``n`` that each hold ``k`` consecutive images of ``x01`` (the attackers) and ``n - k`` clean
    batchmates drawn from ``pool`` (distinct within a batch), in random positions.

    Returns ``(images, labels, mask, order)``: ``order`` gives each batch image's index into ``cat(x01, pool)``,
    so ``mask = order < len(x01)`` marks the ``x01`` images and ``order[mask]`` their indices in ``x01``; a
    remainder of ``x01`` that does not fill ``k`` is left out. Every image of ``x01`` is thus attacked in a
    batch of its own size, so a lone attacker is scored on as many images as the whole-batch threat model.
    """
    batches = x01.shape[0] // k
    if batches == 0 or k > n:
        raise ValueError(f"cannot place {k} attackers per batch of {n} with {x01.shape[0]} images")
    if n - k > pool.shape[0]:
        raise ValueError(f"the pool of {pool.shape[0]} clean images cannot fill batches of {n}")
    draw_on = generator.device
    mates = torch.rand(batches, pool.shape[0], generator=generator, device=draw_on).argsort(dim=1)[:, : n - k]
    positions = torch.rand(batches, n, generator=generator, device=draw_on).argsort(dim=1)
    source = torch.cat([torch.arange(batches * k, device=draw_on).view(batches, k),
                        mates + x01.shape[0]], dim=1)  # index into cat(x01, pool)
    order = source.gather(1, positions).flatten().to(x01.device)
    images = torch.cat([x01, pool])[order]
    all_labels = torch.cat([labels, pool_labels])[order]
    return images, all_labels, order < x01.shape[0], order


GRADIENTS = ("adaptive", "margin", "transfer", "unknown")


def _loss_of(gradient: str) -> str:
    """The loss an attack raises: the clamped margin for the ``margin`` gradient, cross-entropy otherwise."""
    return "margin" if gradient == "margin" else "ce"


def _check_cell(threat: str, attack: str, gradient: str, pool: Tensor | None) -> None:
    _attackers_per_batch(threat, 2)  # raises on an unknown threat model
    if gradient not in GRADIENTS:
        raise ValueError(f"unknown gradient {gradient!r}; use one of {', '.join(GRADIENTS)}")
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"unknown attack {attack!r}; use fgsm or pgd")
    if gradient == "unknown" and (threat != "lone" or pool is None or attack != "pgd"):
        raise ValueError("the unknown-batchmates attacker is PGD, defined for the lone threat with a pool")
    if gradient == "transfer" and threat.startswith("poison:"):
        raise ValueError("poisoning crafted on the frozen model has no gradient towards its victims: use an "
                         "adaptive gradient")


def _ignores_batchmates(card: ModelCard, policy: str, n: int, gradient: str) -> bool:
    """Whether the attack's forward is the frozen model image by image: transfer gradients, or a policy
    that runs frozen statistics for batches of ``n`` (the loss still depends on the gradient: :func:`_loss_of`)."""
    return gradient == "transfer" or _runs_frozen(card, policy, n)


def _runs_frozen(card: ModelCard, policy: str, n: int) -> bool:
    """Whether ``policy`` normalises batches of ``n`` with frozen statistics (predictions ignore batchmates)."""
    return parse_policy(policy).resolve(n, card.norm == "robustnorm").kind == "frozen"


@dataclass
class Crafted:
    """Adversarial batches: ``images`` (whole batches of n), which images the attacker perturbed (``mask``)
    and whose predictions the attack is scored on (``scored``: the attackers, or the victims for poisoning)."""

    images: Tensor
    mask: Tensor
    scored: Tensor


def craft(model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, *, policy: str, n: int, threat: str,
          attack: str, eps: float, steps: int, gradient: str, generator: torch.Generator,
          pool: Tensor | None = None, eot_samples: int = 4, attackers: Tensor | None = None) -> Crafted:
    """Attack consecutive batches of ``n`` images of ``x01`` (its length a multiple of ``n``).

    ``attackers`` (bool per image) says which images the attacker controls, as :func:`assemble_batches`
    returns it; by default the threat model draws them at random positions in every batch.
    """
    adversarial = torch.empty_like(x01)
    masks, scored_masks = [], []
    _check_cell(threat, attack, gradient, pool)
    ignores_batchmates = _ignores_batchmates(card, policy, n, gradient)
    for part in chunks(x01.shape[0], n):
        x, y = x01[part], labels[part]
        groups = x.shape[0] // n
        if attackers is None:
            mask, loss_mask = _threat_masks(threat, groups, n, generator)
        else:
            mask = attackers[part]
            loss_mask = ~mask if threat.startswith("poison:") else None
        mask = mask.to(x.device)
        loss_mask = loss_mask.to(x.device) if loss_mask is not None else None
        if loss_mask is None and ignores_batchmates:
            # The attack's forward ignores batchmates (frozen statistics): attack the attackers' images alone,
            # n times cheaper than through whole batches and the same attack (for ``unknown`` too).
            x_adv = x.clone()
            x_adv[mask] = _attack(deployed_forward(model, card, "frozen", 1), x[mask], y[mask], attack, eps, steps,
                                  generator, loss=_loss_of(gradient))
        elif gradient == "unknown":
            sampler = _unknown_batchmates_sampler(model, card, policy, n, pool, groups)
            x_adv = x.clone()
            x_adv[mask] = attacks.pgd(sampler, x[mask], y[mask], eps, steps=steps, generator=generator,
                                      eot_forward_samples=eot_samples)
        else:
            forward = (deployed_forward(model, card, "frozen", 1) if gradient == "transfer"
                       else deployed_forward(model, card, policy, n))
            x_adv = _attack(forward, x, y, attack, eps, steps, generator, mask=mask, loss_mask=loss_mask,
                            loss=_loss_of(gradient))
        adversarial[part] = x_adv
        masks.append(mask)
        scored_masks.append(loss_mask if loss_mask is not None else mask)
    return Crafted(adversarial, torch.cat(masks), torch.cat(scored_masks))


def _attack(forward: attacks.Forward, x: Tensor, y: Tensor, attack: str, eps: float, steps: int,
            generator: torch.Generator, mask: Tensor | None = None, loss_mask: Tensor | None = None,
            loss: str = "ce") -> Tensor:
    if attack == "fgsm":
        return attacks.fgsm(forward, x, y, eps, mask=mask, loss_mask=loss_mask, loss=loss)
    return attacks.pgd(forward, x, y, eps, steps=steps, mask=mask, loss_mask=loss_mask, generator=generator,
                       loss=loss)


class PerImageAttacks:
    """Adversarial versions of a subset's images, each crafted against the ``frozen`` model on its own.

    Shared by every cell whose attack ignores batchmates (``transfer`` gradients, and any gradient while
    the deployed policy runs frozen statistics at that batch size) and by the frozen reference accuracy, so
    each (attack, eps, steps) is crafted once per model. One instance per model and subset.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, Tensor] = {}

    def get(self, model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, attack: str, eps: float,
            steps: int, seed: int, loss: str = "ce") -> Tensor:
        key = (card.name, attack, eps, steps, x01.shape[0], seed, loss)
        if key not in self._store:
            generator = make_generator(seed, 1, int(eps * 255 * 1000))
            forward = deployed_forward(model, card, "frozen", 1)
            self._store[key] = torch.cat([_attack(forward, x01[part], labels[part], attack, eps, steps, generator,
                                                  loss=loss) for part in chunks(x01.shape[0], 1)])
        return self._store[key]


def split_pool(card: ModelCard, policy: str, n: int, gradient: str, pool: Tensor,
               pool_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(batchmates, their labels, eot_pool)``: where the batchmates come from, and the images an attacker who
    does not know its batchmates guesses them from. They are disjoint halves of ``pool`` when that attacker's
    EOT forward runs, so its guesses never hold the batch it is evaluated in; otherwise both are ``pool``."""
    if gradient != "unknown" or _ignores_batchmates(card, policy, n, gradient):
        return pool, pool_labels, pool
    return pool[0::2], pool_labels[0::2], pool[1::2]


def robust_evaluation(model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, *, policy: str, n: int,
                      threat: str, attack: str, eps: float, steps: int, gradient: str, seed: int = 0,
                      pool: Tensor | None = None, pool_labels: Tensor | None = None, eot_samples: int = 4,
                      per_image: PerImageAttacks | None = None) -> RobustRecord:
    """One cell of the robustness grid.

    Under ``whole`` the images of ``x01`` form consecutive batches of ``n`` (a partial last batch is left
    out). Under the other threat models every image of ``x01`` is an attacker (``poison``: a poisoner) in a
    batch completed with clean images drawn from ``pool``, so each cell scores about as many images as
    ``x01`` holds. ``frozen_attack_accuracy`` is the frozen model's accuracy on the same attackers' images
    under the same attack crafted against it.
    """
    started = time.perf_counter()
    _check_cell(threat, attack, gradient, pool)
    eot_pool = pool
    per_image = per_image if per_image is not None else PerImageAttacks()
    generator = make_generator(seed, n, int(eps * 255 * 1000))
    if threat == "whole":
        usable = x01.shape[0] - x01.shape[0] % n
        if usable == 0:
            raise ValueError(f"{x01.shape[0]} images do not fill one batch of n={n}")
        batch_x01, batch_labels = x01[:usable], labels[:usable]
        attackers = torch.ones(usable, dtype=torch.bool, device=x01.device)
        order = torch.arange(usable, device=x01.device)
    else:
        if pool is None or pool_labels is None:
            raise ValueError(f"threat {threat!r} needs a pool of clean batchmates (pool, pool_labels)")
        pool, pool_labels, eot_pool = split_pool(card, policy, n, gradient, pool, pool_labels)
        k = _attackers_per_batch(threat, n)
        batch_x01, batch_labels, attackers, order = assemble_batches(x01, labels, pool, pool_labels, n, k,
                                                                     generator)
    source = order[attackers]
    poisoning = threat.startswith("poison:")
    loss = _loss_of(gradient)
    if not poisoning and _ignores_batchmates(card, policy, n, gradient):
        adversarial = per_image.get(model, card, x01, labels, attack, eps, steps, seed, loss)
        images = batch_x01.clone()
        images[attackers] = adversarial[source]
        crafted = Crafted(images, attackers, attackers)
    else:
        crafted = craft(model, card, batch_x01, batch_labels, policy=policy, n=n, threat=threat, attack=attack,
                        eps=eps, steps=steps, gradient=gradient, generator=generator, pool=eot_pool,
                        eot_samples=eot_samples, attackers=attackers)
    def predict(images: Tensor) -> Tensor:
        if _runs_frozen(card, policy, n):
            # Predictions do not depend on batchmates: predict each distinct image once. ``order`` identifies the
            # images (each subset image sits in one batch only, so an attacker's crafted image is distinct too).
            return _distinct_predictions(model, card, images, order)
        return predictions(model, card, images, policy, n)

    correct = predict(crafted.images) == batch_labels
    clean_correct = predict(batch_x01) == batch_labels
    batchmates = ~crafted.mask & ~crafted.scored
    frozen_accuracy = None
    if not poisoning:
        frozen_images = per_image.get(model, card, x01, labels, attack, eps, steps, seed, loss)[source]
        frozen_accuracy = accuracy(model, card, frozen_images, labels[source], "frozen", 1)
    return RobustRecord(
        model=card.name, policy=policy, n=n, threat=threat, attack=attack, eps=eps, eps_255=round(eps * 255, 3),
        steps=steps if attack == "pgd" else 1, gradient=gradient, images=batch_x01.shape[0],
        scored_images=int(crafted.scored.sum()),
        robust_accuracy=float(correct[crafted.scored].float().mean()),
        clean_batchmates_accuracy=float(correct[batchmates].float().mean()) if batchmates.any() else None,
        clean_accuracy=float(clean_correct[crafted.scored].float().mean()),
        frozen_attack_accuracy=frozen_accuracy, seconds=round(time.perf_counter() - started, 2),
    )


def _distinct_predictions(model: nn.Module, card: ModelCard, images: Tensor, identity: Tensor) -> Tensor:
    """``frozen`` predictions of ``images``, where equal ``identity`` values mark equal images: each distinct
    image runs through the model once (a lone-attacker cell at n = 128 repeats its clean batchmates 128 times)."""
    distinct, inverse = torch.unique(identity, return_inverse=True)
    first = torch.empty(distinct.numel(), dtype=torch.long, device=identity.device)
    first.scatter_(0, inverse, torch.arange(identity.numel(), device=identity.device))
    return predictions(model, card, images[first], "frozen", 1)[inverse]


# ----------------------------------------------------------------------------------------- drift evidence


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
    from .drift import MEASURES, drift_report

    set_policy(model, card.policy)
    layers: dict[str, dict[str, list[float]]] = {}
    batch_scores, image_scores = [], []
    for part in chunks(x01.shape[0], n):
        with batch_groups(model, [n] * ((part.stop - part.start) // n), record=True) as run:
            model(normalize(x01[part], card.mean, card.std))
        report = drift_report(run, card.calibration)
        for name, values in report.layers.items():
            for measure in MEASURES:
                layers.setdefault(name, {}).setdefault(measure, []).extend(values[measure])
        batch_scores += [float("nan") if v is None else v for v in report.batch_score]
        image_scores += report.image_score or [float("nan")] * (part.stop - part.start)
    means = {name: {m: sum(v) / len(v) for m, v in measures.items()} for name, measures in layers.items()}
    return means, torch.tensor(batch_scores), torch.tensor(image_scores)


def drift_evidence(model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, n: int = 32, eps: float = 8 / 255,
                   steps: int = 20, severity: int = 3, seed: int = 0) -> dict:
    """Per-layer drift and ROC AUC of the batch and image scores, clean against adversarial (whole batch and
    lone attacker, PGD through the deployed model) and corrupted batches (the project's own corruptions)."""
    from .corruptions import CORRUPTIONS, corrupt

    usable = x01.shape[0] - x01.shape[0] % n
    x01, labels = x01[:usable], labels[:usable]
    generator = make_generator(seed, n)
    shifted: dict[str, tuple[Tensor, Tensor | None]] = {}
    for threat in ("whole", "lone"):
        crafted = craft(model, card, x01, labels, policy=card.policy, n=n, threat=threat, attack="pgd", eps=eps,
                        steps=steps, gradient="adaptive", generator=generator)
        shifted[f"pgd_{threat}"] = (crafted.images, crafted.mask)
    for name in CORRUPTIONS:
        shifted[name] = (corrupt(name, x01, severity, generator=make_generator(seed, 7)), None)
    clean_layers, clean_batch, clean_image = _drift_of(model, card, x01, n)
    result = {"n": n, "eps_255": round(eps * 255, 3), "steps": steps, "severity": severity, "policy": card.policy,
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


# ----------------------------------------------------------------------------------------- the grid


@dataclass
class Grid:
    """Which cells to run. ``core`` is the issue's mandatory grid; ``smoke`` a tiny one for CPU checks."""

    clean_sizes: tuple[int, ...]
    blend_n0: tuple[float, ...]
    skew_sizes: tuple[int, ...]
    skew_classes: tuple[int, ...]
    robust_sizes: tuple[int, ...]
    robust_eps_255: tuple[float, ...]
    robust_threats: tuple[str, ...]
    robust_gradients: tuple[str, ...]
    sweep_size: int  # FGSM and every eps, whole batch
    sweep_eps_255: tuple[float, ...]
    extra_size: int  # fractions, poisoning and the unknown-batchmates attacker
    extra_threats: tuple[str, ...]
    steps: int
    margin_threats: tuple[str, ...] = ()  # adaptive attacks on the clamped margin too, at every robust n and eps
    margin_extra: bool = False  # ... and at every eps of the sweep, and on fractions of the batch


GRIDS = {
    "core": Grid(ALL_BATCH_SIZES, (4, 16, 64), (32, 128), (1, 2, 5), (1, 8, 32, 128), (2, 8), ("whole", "lone"),
                 ("adaptive", "transfer"), 128, (1, 2, 4, 8), 32, ("fraction:0.1", "fraction:0.5", "poison:3"), 20,
                 ("whole",), True),
    "smoke": Grid((1, 4, 16), (16,), (16,), (1,), (1, 8), (8,), ("whole", "lone"), ("adaptive", "transfer"), 8,
                  (2,), 8, ("fraction:0.5",), 3, ("whole",), True),
}


def _policies(card: ModelCard) -> list[str]:
    """frozen, batch and the card's deployed policy (the calibrated adaptive one), without repeats."""
    return list(dict.fromkeys(["frozen", "batch", card.policy]))


def _cell_key(record: dict) -> tuple:
    return (record["policy"], record["n"], record["threat"], record["attack"], record["eps_255"], record["gradient"])


@dataclass(frozen=True)
class CellFilter:
    """A slice of the robust cells (``--only-*``): an empty field admits every value."""

    sizes: Sequence[int] = ()
    threats: Sequence[str] = ()
    gradients: Sequence[str] = ()
    eps_255: Sequence[float] = ()
    policies: Sequence[str] = ()

    def admits(self, policy: str, n: int, threat: str, eps_255: float, gradient: str) -> bool:
        return ((not self.sizes or n in self.sizes) and (not self.threats or threat in self.threats)
                and (not self.gradients or gradient in self.gradients)
                and (not self.eps_255 or any(abs(eps_255 - e) < 1e-6 for e in self.eps_255))
                and (not self.policies or policy in self.policies))


def evaluate_model(model: nn.Module, card: ModelCard, test_x01: Tensor, test_labels: Tensor, robust_x01: Tensor,
                   robust_labels: Tensor, grid: Grid, seed: int = 0, pool: Tensor | None = None,
                   pool_labels: Tensor | None = None, previous: dict | None = None,
                   on_progress: Callable[[dict], None] | None = None, max_cell_images: int | None = None,
                   only: CellFilter | None = None) -> dict:
    """Run the whole grid for one model; returns a JSON-ready dict.

    ``pool``: clean batchmates for the threat models with clean images in the batch (default: the robust
    subset itself). ``previous``: an earlier, interrupted result for the same model and version, whose
    sections and robust cells are kept rather than recomputed. ``on_progress(results)`` runs after every
    robust cell, so a caller can save partial results. ``max_cell_images``: leave out the cells whose attack
    runs more images per step than this (lone attackers and EOT at large n), to be filled in later with
    ``--resume`` on faster hardware; left-out cells are logged, never reported. ``only`` likewise leaves out
    the robust cells it does not admit.
    """
    results: dict = {"model": card.name, "version": card.version, "policy": card.policy, "p": card.p,
                     "clean": [], "skewed": [], "robust": []}
    if previous is not None:
        for section in ("clean", "skewed", "robust"):
            results[section] = list(previous.get(section, []))
    if not results["clean"]:
        _clean_sections(model, card, test_x01, test_labels, grid, seed, results)
    done = {_cell_key(record): record for record in results["robust"]}
    per_image = PerImageAttacks()
    if pool is None or pool_labels is None:
        pool, pool_labels = robust_x01, robust_labels
    subset = robust_x01.shape[0]
    for policy, n, threat, attack, eps_255, gradient in _in_cost_order(card, _robust_cells(card, grid), subset):
        key = (policy, n, threat, attack, round(eps_255, 3), gradient)
        if key in done:
            continue
        if only is not None and not only.admits(policy, n, threat, eps_255, gradient):
            continue
        cost = _cell_images(card, policy, n, threat, gradient, subset)
        if max_cell_images is not None and cost > max_cell_images:
            logger.info("left out %s: %d images per attack step > --max-cell-images %d", key, cost, max_cell_images)
            continue
        twin = next((record for other, record in done.items() if _same_computation(card, other, key)), None)
        if twin is not None:
            copied = twin.get("same_as") or (twin["policy"] if twin["gradient"] == gradient
                                             else f"{twin['policy']}, {twin['gradient']} gradient")
            record = dict(twin, policy=policy, gradient=gradient, seconds=0.0, same_as=copied)
        else:
            record = asdict(robust_evaluation(
                model, card, robust_x01, robust_labels, policy=policy, n=n, threat=threat, attack=attack,
                eps=eps_255 / 255, steps=grid.steps, gradient=gradient, seed=seed, pool=pool, pool_labels=pool_labels,
                per_image=per_image))
        results["robust"].append(record)
        done[key] = record
        logger.info("robust %s", record)
        if on_progress is not None:
            on_progress(results)
    return results


def _same_computation(card: ModelCard, done: tuple, cell: tuple) -> bool:
    """Whether ``cell`` repeats ``done`` (both ``(policy, n, threat, attack, eps_255, gradient)``): a policy that
    resolves to the same statistics at n, and the same gradient, or any gradients of the same loss when both
    attacks ignore batchmates (then each is the per-image attack on the frozen model with that loss)."""
    robust = card.norm == "robustnorm"
    n, threat = cell[1], cell[2]
    if done[1:5] != cell[1:5] or (str(parse_policy(done[0]).resolve(n, robust))
                                  != str(parse_policy(cell[0]).resolve(n, robust))):
        return False
    if done[5] == cell[5]:
        return True
    return (not threat.startswith("poison:") and _loss_of(done[5]) == _loss_of(cell[5])
            and all(_ignores_batchmates(card, c[0], n, c[5]) for c in (done, cell)))


def _clean_sections(model: nn.Module, card: ModelCard, test_x01: Tensor, test_labels: Tensor, grid: Grid, seed: int,
                    results: dict) -> None:
    """Clean accuracy per policy and batch size, and on label-skewed batches, into ``results``."""
    clean_policies = _policies(card) + [f"blend:{n0:g}" for n0 in grid.blend_n0]
    for policy in dict.fromkeys(clean_policies):
        for n in grid.clean_sizes:
            results["clean"].append({"policy": policy, "n": n, "images": test_x01.shape[0] - test_x01.shape[0] % n,
                                     "accuracy": accuracy(model, card, test_x01, test_labels, policy, n)})
            logger.info("clean %s n=%d: %.4f", policy, n, results["clean"][-1]["accuracy"])
    for classes in grid.skew_classes:
        for n in grid.skew_sizes:
            order = skewed_order(test_labels, n, classes, seed).to(test_labels.device)
            if order.numel() == 0:
                logger.warning("skipped skewed batches of %d with %d classes: too few test images", n, classes)
                continue
            for policy in _policies(card):
                results["skewed"].append({"policy": policy, "n": n, "classes_per_batch": classes,
                                          "images": int(order.numel()),
                                          "accuracy": accuracy(model, card, test_x01[order], test_labels[order],
                                                               policy, n)})


def _cell_images(card: ModelCard, policy: str, n: int, threat: str, gradient: str, subset: int,
                 eot_samples: int = 4) -> int:
    """Images one attack step of a cell runs through the model (per-image attacks: the subset once)."""
    if not threat.startswith("poison:") and _ignores_batchmates(card, policy, n, gradient):
        return subset
    k = _attackers_per_batch(threat, n)
    images = (subset // k) * n
    return images * eot_samples if gradient == "unknown" else images


def _in_cost_order(card: ModelCard, cells: list[tuple[str, int, str, str, float, str]],
                   subset: int) -> list[tuple[str, int, str, str, float, str]]:
    """``cells`` cheapest first, so that a run cut off by a time limit has done as many cells as it could:
    first the cells that reuse per-image attacks (one attack per eps, then forwards only), then by images
    per attack step, then the largest n and eps (the headline's cells). Stable, so a policy's twin still
    follows the cell it copies. Every cell draws its own random numbers, so the order changes no figure."""

    def cost(cell: tuple[str, int, str, str, float, str]) -> tuple:
        policy, n, threat, _, eps_255, gradient = cell
        reuses = not threat.startswith("poison:") and _ignores_batchmates(card, policy, n, gradient)
        return not reuses, _cell_images(card, policy, n, threat, gradient, subset), -n, -eps_255

    return sorted(cells, key=cost)


def _robust_cells(card: ModelCard, grid: Grid) -> list[tuple[str, int, str, str, float, str]]:
    """(policy, n, threat, attack, eps in 1/255, gradient) of every robust cell, without repeats."""
    cells = [(policy, n, threat, "pgd", eps, gradient) for policy in _policies(card) for n in grid.robust_sizes
             for eps in grid.robust_eps_255 for threat in grid.robust_threats for gradient in grid.robust_gradients]
    # FGSM and every eps on whole batches of the sweep size, under every policy (at the eps between 2 and 8
    # the frozen model is broken but not yet at 0, where a policy's gain can show): PGD with every gradient of
    # the grid, since an adaptive gradient through batch statistics can be masked; FGSM adaptively.
    cells += [(policy, grid.sweep_size, "whole", attack, eps, gradient) for policy in _policies(card)
              for attack in ("fgsm", "pgd") for eps in grid.sweep_eps_255
              for gradient in (grid.robust_gradients if attack == "pgd" else ("adaptive",))]
    # Fractions are attacked with every gradient of the grid; poisoning only adaptively (crafted against
    # ``frozen``, whose images do not interact, poison would have no gradient towards its victims).
    cells += [(policy, grid.extra_size, threat, "pgd", max(grid.robust_eps_255), gradient)
              for policy in _policies(card) for threat in grid.extra_threats
              for gradient in (("adaptive",) if threat.startswith("poison:") else grid.robust_gradients)]
    cells += [(policy, grid.extra_size, "lone", "pgd", max(grid.robust_eps_255), "unknown")
              for policy in _policies(card)]
    # The clamped margin, where the coupled cross-entropy is weak: images sharing batch statistics (attacks.py).
    cells += [(policy, n, threat, "pgd", eps, "margin") for policy in _policies(card) for n in grid.robust_sizes
              for eps in grid.robust_eps_255 for threat in grid.margin_threats]
    if grid.margin_extra:
        # Fractions share batch statistics among their adversarial images too, so the coupled loss is as weak.
        cells += [(policy, grid.sweep_size, "whole", "pgd", eps, "margin") for policy in _policies(card)
                  for eps in grid.sweep_eps_255]
        cells += [(policy, grid.extra_size, threat, "pgd", max(grid.robust_eps_255), "margin")
                  for policy in _policies(card) for threat in grid.extra_threats if threat.startswith("fraction:")]
    return list(dict.fromkeys(cells))


# ----------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["cifar10-resnet20-bn", "cifar10-resnet20-robustnorm"],
                        help="bundled model names or model directories")
    parser.add_argument("--data", default=None,
                        help="CIFAR-10 folder with train.tar.gz and test.tar.gz (default: $ROBUSTNORM_CIFAR10, else "
                        "../shared/data/cifar10 beside the checkout)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="core",
                        help="core: the issue's grid; smoke: a tiny one for quick CPU checks")
    parser.add_argument("--robust-images", type=int, default=2000,
                        help="fixed, class-balanced test subset for attacks (default 2000)")
    parser.add_argument("--test-images", type=int, default=10000, help="test images for clean accuracy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets, threat models and attacks")
    parser.add_argument("--sections", nargs="+", choices=("grid", "drift"), default=["grid", "drift"],
                        help="the accuracy grid, the drift evidence, or both")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robustness/robustness.json"),
                        help="results JSON (default: benchmarks/results/robustness/robustness.json)")
    parser.add_argument("--max-cell-images", type=int, default=None, metavar="N",
                        help="leave out cells whose attack runs more than N images per step (e.g. 20000 on a CPU: "
                        "lone attackers at large n); fill them in later with --resume")
    parser.add_argument("--only-sizes", type=int, nargs="+", metavar="N",
                        help="run only the robust cells of these batch sizes (the rest later, with --resume)")
    parser.add_argument("--only-threats", nargs="+", metavar="THREAT",
                        help="run only the robust cells of these threat models, e.g. whole lone fraction:0.1")
    parser.add_argument("--only-gradients", nargs="+", choices=GRADIENTS, metavar="GRADIENT",
                        help=f"run only the robust cells of these gradients ({', '.join(GRADIENTS)})")
    parser.add_argument("--only-eps", type=float, nargs="+", metavar="EPS_255",
                        help="run only the robust cells of these eps, in 1/255 (e.g. 2)")
    parser.add_argument("--only-policies", nargs="+", metavar="POLICY",
                        help="run only the robust cells of these policies, e.g. batch blend:512 (two processes on "
                        "two copies of --out can then share a model's cells; --merge them afterwards)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="COPY",
                        help="run nothing: add to --out the robust cells that runs on copies of it wrote")
    parser.add_argument("--resume", action="store_true",
                        help="keep what --out already holds for the same models, data and grid, and run only the "
                        "rest (the file is rewritten after every robust cell)")


def evaluation_images(test: ImageDataset, test_images: int, robust_images: int,
                      seed: int) -> tuple[ImageDataset, Tensor]:
    """The test images for clean accuracy, in the grid's order, and the indices (into them) of the fixed,
    class-balanced subset that robust cells attack; the same for every caller with the same ``seed``."""
    if test_images < len(test):
        test = test.subset(balanced_subset(test.labels, test_images // len(test.classes), seed=seed))
    else:  # a fixed shuffle: the archive is ordered by class, and batches must mix classes
        test = test.subset(torch.randperm(len(test), generator=make_generator(seed)))
    return test, balanced_subset(test.labels, robust_images // len(test.classes), seed=seed + 1)


def _timeless(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "seconds"}


def merge_results(into: dict, other: dict) -> int:
    """Add to ``into`` the robust cells of ``other`` (the same models, data, grid and seed, e.g. a copy that
    another process resumed with ``--only-policies``) that it does not hold; returns how many were added. Cells
    both hold must have the same figures (their times may differ): an earlier figure is never replaced."""
    if any(into.get(key) != other.get(key) for key in _SAME_RUN):
        raise ValueError("--merge: the results are for another format, other data, another grid or seed")
    small, large = sorted((into.get("grid_spec") or {}, other.get("grid_spec") or {}), key=len)
    if not _grown(small, large):
        raise ValueError("--merge: the results are for another grid")
    into["grid_spec"] = large
    added = 0
    for entry in other["models"]:
        target = next((mine for mine in into["models"] if mine["model"] == entry["model"]), None)
        if target is None or target.get("card_digest") != entry.get("card_digest"):
            raise ValueError(f"--merge: {entry['model']} is not the same model in both results")
        held = {_cell_key(record): record for record in target["robust"]}
        for record in entry["robust"]:
            if _cell_key(record) not in held:
                target["robust"].append(record)
                target["seconds"] = round(target.get("seconds", 0.0) + record["seconds"], 1)
                added += 1
            elif _timeless(held[_cell_key(record)]) != _timeless(record):
                raise ValueError(f"--merge: {entry['model']} cell {_cell_key(record)} differs between the results")
    into["device"] = " + ".join(dict.fromkeys([*into["device"].split(" + "), *other["device"].split(" + ")]))
    return added


def run(args: argparse.Namespace) -> int:
    if args.merge:
        merged = json.loads(args.out.read_text())
        for path in args.merge:
            logger.info("%s: %d cells added from %s", args.out, merge_results(merged, json.loads(path.read_text())),
                        path)
        _write_results(args.out, merged)
        return 0
    device = torch.device(args.device)
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
    if args.resume:  # keep every earlier model entry; those run again are replaced in place
        report["models"] = _resumable(args.out, report)
        if report["models"]:  # where the earlier cells ran, as well as this run's device
            earlier = json.loads(args.out.read_text())
            devices = [*earlier["device"].split(" + "), report["device"]]
            report["device"] = " + ".join(dict.fromkeys(devices))

    def save() -> None:
        _write_results(args.out, report)

    for name in args.models:
        model, card = load_model(name, device=device)
        started = time.perf_counter()
        result = {"model": card.name, "version": card.version, "policy": card.policy, "p": card.p,
                  "card_digest": _card_digest(card)}
        index = next((i for i, entry in enumerate(report["models"]) if entry["model"] == card.name), None)
        previous = report["models"][index] if index is not None else {}
        if previous.get("card_digest") != result["card_digest"]:
            previous = {}  # other weights or policy: nothing earlier applies
        if previous.get("drift", {}).get("calibration_digest") != _calibration_digest(card):
            previous.pop("drift", None)  # drift scores read the card's drift calibration
        result.update({key: value for key, value in previous.items() if key not in result})
        if index is None:
            report["models"].append(result)
        else:
            report["models"][index] = result
        spent = previous.get("seconds", 0.0)

        def progress(partial: dict, into: dict = result, since: float = started, before: float = spent) -> None:
            into.update(partial)
            into["seconds"] = round(time.perf_counter() - since + before, 1)
            save()

        if "grid" in args.sections:
            result.update(evaluate_model(model, card, test_x01, test.labels, robust_x01, robust_labels, grid,
                                         args.seed, pool=pool_x01, pool_labels=pool_labels, previous=previous,
                                         on_progress=progress, max_cell_images=args.max_cell_images,
                                         only=CellFilter(args.only_sizes or (), args.only_threats or (),
                                                         args.only_gradients or (), args.only_eps or (),
                                                         args.only_policies or ())))
        if "drift" in args.sections and "drift" not in result:
            result["drift"] = drift_evidence(model, card, robust_x01, robust_labels, steps=grid.steps, seed=args.seed)
            result["drift"]["calibration_digest"] = _calibration_digest(card)
        progress({})
    print(f"wrote {args.out}")
    return 0


RESULTS_FORMAT = 2  # 2: lone attackers, fractions and poisoning score every subset image (scored_images)


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _card_digest(card: ModelCard) -> str:
    """What the accuracy cells of a model depend on besides the data: its weights and deployed policy."""
    return _digest([card.version, card.policy])


def _calibration_digest(card: ModelCard) -> str:
    """What the drift section depends on as well: the card's drift calibration (the scores read it)."""
    return _digest(card.calibration and card.calibration.to_dict())


_SAME_RUN = ("format", "dataset", "grid", "seed", "robust_images", "test_images")  # results that can be combined


def _grown(spec: dict, later: dict) -> bool:
    """Whether grid ``later`` is ``spec`` with fields added since (such as margin_threats): those only add cells,
    and every cell is keyed on its own."""
    return all(key in later and later[key] == value for key, value in spec.items())


def _write_results(path: Path, report: dict) -> None:
    """Write atomically, so that a run cut off mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(_without_nan(report), indent=1, allow_nan=False) + "\n")
    partial.replace(path)


def _resumable(path: Path, report: dict) -> list[dict]:
    """The model entries an earlier run with the same format, data, grid and seed left in ``path``."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    spec, earlier_spec = json.loads(json.dumps(report["grid_spec"])), earlier.get("grid_spec") or {}
    if not _grown(earlier_spec, spec) or any(earlier.get(key) != json.loads(json.dumps(report[key]))
                                             for key in _SAME_RUN):
        raise ValueError(f"--resume: {path} holds results for another format, other data or another grid; "
                         "choose another --out")
    return list(earlier.get("models", []))


def _without_nan(value: object) -> object:
    """``value`` with every NaN float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value
