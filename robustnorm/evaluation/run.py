"""Running one robust cell: batches under its threat model, the attack, and the figures it yields.

Under ``whole`` the images of the subset form consecutive batches of n (a partial last batch is left out).
Under the other threat models every subset image is an attacker (``poison``: a poisoner) in a batch of its
own, completed with clean batchmates drawn from a pool of other images, so each cell scores about as many
images as the subset holds. Each record also carries ``frozen_attack_accuracy``: the ``frozen`` model's
accuracy on the same attackers' images under the same attack crafted against it, so that gradient masking
cannot pass for robustness.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from ..data import make_generator
from ..io import ModelCard
from ..policy import FROZEN
from ..scoring import accuracy, predictions
from .cells import Cell, RobustRecord
from .craft import Crafted, PerImageAttacks, assemble_batches, craft


def split_pool(cell: Cell, robust: bool, pool: Tensor, pool_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(batchmates, their labels, eot_pool)``: where the batchmates come from, and the images an attacker who
    does not know its batchmates guesses them from. They are disjoint halves of ``pool`` when that attacker's
    EOT forward runs, so its guesses never hold the batch it is evaluated in; otherwise both are ``pool``."""
    if cell.gradient != "unknown" or cell.ignores_batchmates(robust):
        return pool, pool_labels, pool
    return pool[0::2], pool_labels[0::2], pool[1::2]


def distinct_predictions(model: nn.Module, card: ModelCard, images: Tensor, identity: Tensor) -> Tensor:
    """``frozen`` predictions of ``images``, where equal ``identity`` values mark equal images: each distinct
    image runs through the model once (a lone-attacker cell at n = 128 repeats its clean batchmates 128 times)."""
    distinct, inverse = torch.unique(identity, return_inverse=True)
    first = torch.empty(distinct.numel(), dtype=torch.long, device=identity.device)
    first.scatter_(0, inverse, torch.arange(identity.numel(), device=identity.device))
    return predictions(model, card, images[first], FROZEN, 1)[inverse]


def run_cell(model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, cell: Cell, *, steps: int,
             seed: int = 0, pool: Tensor | None = None, pool_labels: Tensor | None = None, eot_samples: int = 4,
             per_image: PerImageAttacks | None = None) -> RobustRecord:
    """One robust cell on the subset ``x01`` (module docstring); ``pool``, ``pool_labels``: the clean
    batchmates every threat model but ``whole`` needs. ``per_image`` shares frozen per-image attacks between
    the cells of one model and subset."""
    started = time.perf_counter()
    robust = card.norm == "robustnorm"
    n, threat = cell.n, cell.threat
    eot_pool = pool
    per_image = per_image if per_image is not None else PerImageAttacks()
    generator = make_generator(seed, n, int(cell.eps * 255 * 1000))
    if threat.kind == "whole":
        usable = x01.shape[0] - x01.shape[0] % n
        if usable == 0:
            raise ValueError(f"{x01.shape[0]} images do not fill one batch of n={n}")
        batch_x01, batch_labels = x01[:usable], labels[:usable]
        attackers = torch.ones(usable, dtype=torch.bool, device=x01.device)
        order = torch.arange(usable, device=x01.device)
    else:
        if pool is None or pool_labels is None:
            raise ValueError(f"threat {threat} needs a pool of clean batchmates (pool, pool_labels)")
        pool, pool_labels, eot_pool = split_pool(cell, robust, pool, pool_labels)
        batch_x01, batch_labels, attackers, order = assemble_batches(
            x01, labels, pool, pool_labels, n, threat.attackers_per_batch(n), generator)
    source = order[attackers]
    if cell.per_image(robust):
        adversarial = per_image.get(model, card, x01, labels, cell, steps, seed)
        images = batch_x01.clone()
        images[attackers] = adversarial[source]
        crafted = Crafted(images, attackers, attackers)
    else:
        crafted = craft(model, card, batch_x01, batch_labels, cell, steps=steps, generator=generator, pool=eot_pool,
                        eot_samples=eot_samples, attackers=attackers)

    def predict(images: Tensor) -> Tensor:
        if cell.runs_frozen(robust):
            # Predictions do not depend on batchmates: predict each distinct image once. ``order`` identifies the
            # images (each subset image sits in one batch only, so an attacker's crafted image is distinct too).
            return distinct_predictions(model, card, images, order)
        return predictions(model, card, images, cell.policy, n)

    correct = predict(crafted.images) == batch_labels
    clean_correct = predict(batch_x01) == batch_labels
    batchmates = ~crafted.mask & ~crafted.scored
    frozen_accuracy = None
    if not threat.poisoning:
        frozen_images = per_image.get(model, card, x01, labels, cell, steps, seed)[source]
        frozen_accuracy = accuracy(model, card, frozen_images, labels[source], FROZEN, 1)
    return RobustRecord(
        model=card.name, policy=str(cell.policy), n=n, threat=str(threat), attack=cell.attack, eps=cell.eps,
        eps_255=round(cell.eps * 255, 3), steps=steps if cell.attack == "pgd" else 1, gradient=cell.gradient,
        images=batch_x01.shape[0], scored_images=int(crafted.scored.sum()),
        robust_accuracy=float(correct[crafted.scored].float().mean()),
        clean_batchmates_accuracy=float(correct[batchmates].float().mean()) if batchmates.any() else None,
        clean_accuracy=float(clean_correct[crafted.scored].float().mean()),
        frozen_attack_accuracy=frozen_accuracy, seconds=round(time.perf_counter() - started, 2),
    )
