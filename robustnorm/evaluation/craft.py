"""Crafting a cell's adversarial batches: where the attackers sit, which forward the gradient runs through.

Contracts:
- :func:`assemble_batches` completes every ``k`` attacker images with ``n - k`` clean batchmates from a pool;
- :func:`craft` attacks consecutive batches of ``n`` under a cell's threat model and gradient: through the
  model as deployed (``adaptive``, ``margin``), through the ``frozen`` model (``transfer``), or in expectation
  over freshly drawn batchmates (``unknown``); when the attack's forward ignores batchmates, only the
  attacker's images are attacked, one by one, which is the same attack at a fraction of the cost;
- :class:`PerImageAttacks` keeps, per model and subset, each image's attack on the ``frozen`` model, shared by
  every cell that reuses it and by the frozen reference accuracy.
Attacks run on [0, 1] pixels (:mod:`robustnorm.attacks`); every random draw comes from the generator given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import attacks
from ..data import make_generator
from ..io import ModelCard
from ..policy import FROZEN, Policy
from ..scoring import chunks, deployed_forward
from .cells import Cell


@dataclass
class Crafted:
    """Adversarial batches: ``images`` (whole batches of n), which images the attacker perturbed (``mask``)
    and whose predictions the attack is scored on (``scored``: the attackers, or the victims for poisoning)."""

    images: Tensor
    mask: Tensor
    scored: Tensor


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


def unknown_batchmates_sampler(model: nn.Module, card: ModelCard, policy: Policy, n: int, pool: Tensor,
                               groups: int) -> attacks.ForwardSampler:
    """EOT forward for a lone attacker who does not know its batchmates: each sample puts every attacker
    image first in a batch of ``n - 1`` freshly drawn clean pool images; returns the attackers' logits."""
    forward_batches = deployed_forward(model, card, policy, n)

    def sample(generator: torch.Generator | None) -> attacks.Forward:
        draw = torch.randint(0, pool.shape[0], (groups, n - 1), generator=generator).to(pool.device)

        def forward(attackers: Tensor) -> Tensor:
            batch = torch.cat([attackers.unsqueeze(1), pool[draw]], dim=1).flatten(0, 1)
            return forward_batches(batch).view(groups, n, -1)[:, 0]

        return forward

    return sample


def craft(model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, cell: Cell, *, steps: int,
          generator: torch.Generator, pool: Tensor | None = None, eot_samples: int = 4,
          attackers: Tensor | None = None) -> Crafted:
    """Attack consecutive batches of ``cell.n`` images of ``x01`` (its length a multiple of n) as ``cell`` says.

    ``attackers`` (bool per image) says which images the attacker controls, as :func:`assemble_batches`
    returns it; by default the threat model draws them at random positions in every batch. ``pool``: the clean
    images an ``unknown`` attacker guesses its batchmates from.
    """
    if cell.gradient == "unknown" and pool is None:
        raise ValueError("the unknown-batchmates attacker guesses its batchmates from a pool: pass pool")
    n, robust = cell.n, card.norm == "robustnorm"
    adversarial = torch.empty_like(x01)
    masks, scored_masks = [], []
    per_image_forward = deployed_forward(model, card, FROZEN, 1)
    for part in chunks(x01.shape[0], n):
        x, y = x01[part], labels[part]
        groups = x.shape[0] // n
        if attackers is None:
            mask, loss_mask = cell.threat.masks(groups, n, generator)
        else:
            mask = attackers[part]
            loss_mask = ~mask if cell.threat.poisoning else None
        mask = mask.to(x.device)
        loss_mask = loss_mask.to(x.device) if loss_mask is not None else None
        if loss_mask is None and cell.ignores_batchmates(robust):
            # The attack's forward ignores batchmates (frozen statistics): attack the attackers' images alone,
            # n times cheaper than through whole batches and the same attack (for ``unknown`` too).
            x_adv = x.clone()
            x_adv[mask] = attack(per_image_forward, x[mask], y[mask], cell, steps, generator)
        elif cell.gradient == "unknown":
            assert pool is not None
            sampler = unknown_batchmates_sampler(model, card, cell.policy, n, pool, groups)
            x_adv = x.clone()
            x_adv[mask] = attacks.pgd(sampler, x[mask], y[mask], cell.eps, steps=steps, generator=generator,
                                      eot_forward_samples=eot_samples)
        else:
            forward = (per_image_forward if cell.gradient == "transfer"
                       else deployed_forward(model, card, cell.policy, n))
            x_adv = attack(forward, x, y, cell, steps, generator, mask=mask, loss_mask=loss_mask)
        adversarial[part] = x_adv
        masks.append(mask)
        scored_masks.append(loss_mask if loss_mask is not None else mask)
    return Crafted(adversarial, torch.cat(masks), torch.cat(scored_masks))


def attack(forward: attacks.Forward, x: Tensor, y: Tensor, cell: Cell, steps: int, generator: torch.Generator,
           mask: Tensor | None = None, loss_mask: Tensor | None = None) -> Tensor:
    """``cell``'s attack (FGSM or PGD of ``steps`` steps, at its eps, on its gradient's loss) through ``forward``."""
    if cell.attack == "fgsm":
        return attacks.fgsm(forward, x, y, cell.eps, mask=mask, loss_mask=loss_mask, loss=cell.loss)
    return attacks.pgd(forward, x, y, cell.eps, steps=steps, mask=mask, loss_mask=loss_mask, generator=generator,
                       loss=cell.loss)


class PerImageAttacks:
    """Adversarial versions of a subset's images, each crafted against the ``frozen`` model on its own.

    Shared by every cell whose attack ignores batchmates (``transfer`` gradients, and any gradient while
    the deployed policy runs frozen statistics at that batch size) and by the frozen reference accuracy, so
    each (attack, eps, steps, loss) is crafted once per model. One instance per model and subset.
    """

    def __init__(self) -> None:
        self._store: dict[tuple, Tensor] = {}

    def get(self, model: nn.Module, card: ModelCard, x01: Tensor, labels: Tensor, cell: Cell, steps: int,
            seed: int) -> Tensor:
        """``x01`` attacked image by image with ``cell``'s attack, eps and loss (its policy and n do not matter)."""
        key = (card.name, cell.attack, cell.eps, steps, x01.shape[0], seed, cell.loss)
        if key not in self._store:
            generator = make_generator(seed, 1, int(cell.eps * 255 * 1000))
            forward = deployed_forward(model, card, FROZEN, 1)
            self._store[key] = torch.cat([attack(forward, x01[part], labels[part], cell, steps, generator)
                                          for part in chunks(x01.shape[0], 1)])
        return self._store[key]
