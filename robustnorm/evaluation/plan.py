"""Planning the grid: which cells a model gets, which a run leaves out, in what order, and which repeat others.

Contracts:
- :func:`robust_cells` lists every robust cell of a :class:`Grid` for a card, without repeats, in a fixed order;
- :func:`in_cost_order` sorts cells cheapest first (stable), so that a run cut off by a time limit has done as
  many cells as it could; every cell draws its own random numbers, so the order changes no figure;
- :func:`same_computation` says when a cell repeats one already computed (its record is copied, ``same_as``);
- :class:`CellFilter` is a slice of the cells (``--only-*``), :func:`attack_images` a cell's cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..io import ModelCard
from ..policy import Policy, parse_policy
from .cells import Cell
from .threats import LONE, WHOLE, Threat, parse_threat

ALL_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Grid:
    """Which cells to run. ``core`` is the full grid; ``smoke`` a tiny one for CPU checks."""

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


def policies(card: ModelCard) -> list[Policy]:
    """frozen, batch and the card's deployed policy (the calibrated adaptive one), without repeats."""
    return list(dict.fromkeys(parse_policy(name) for name in ("frozen", "batch", card.policy)))


def robust_cells(card: ModelCard, grid: Grid) -> list[Cell]:
    """Every robust cell of ``grid`` for the model of ``card``, without repeats."""
    deployed = policies(card)
    threats = [parse_threat(threat) for threat in grid.robust_threats]
    extra = [parse_threat(threat) for threat in grid.extra_threats]
    margin = [parse_threat(threat) for threat in grid.margin_threats]
    fractions = [threat for threat in extra if threat.kind == "fraction"]
    top_eps = max(grid.robust_eps_255)
    cells = [Cell(policy, n, threat, "pgd", eps, gradient) for policy in deployed for n in grid.robust_sizes
             for eps in grid.robust_eps_255 for threat in threats for gradient in grid.robust_gradients]
    # FGSM and every eps on whole batches of the sweep size, under every policy (at the eps between 2 and 8
    # the frozen model is broken but not yet at 0, where a policy's gain can show): PGD with every gradient of
    # the grid, since an adaptive gradient through batch statistics can be masked; FGSM adaptively.
    cells += [Cell(policy, grid.sweep_size, WHOLE, attack, eps, gradient) for policy in deployed
              for attack in ("fgsm", "pgd") for eps in grid.sweep_eps_255
              for gradient in (grid.robust_gradients if attack == "pgd" else ("adaptive",))]
    # Fractions are attacked with every gradient of the grid; poisoning only adaptively (crafted against
    # ``frozen``, whose images do not interact, poison would have no gradient towards its victims).
    cells += [Cell(policy, grid.extra_size, threat, "pgd", top_eps, gradient) for policy in deployed
              for threat in extra for gradient in (("adaptive",) if threat.poisoning else grid.robust_gradients)]
    cells += [Cell(policy, grid.extra_size, LONE, "pgd", top_eps, "unknown") for policy in deployed]
    # The clamped margin, where the coupled cross-entropy is weak: images sharing batch statistics (attacks.py).
    cells += [Cell(policy, n, threat, "pgd", eps, "margin") for policy in deployed for n in grid.robust_sizes
              for eps in grid.robust_eps_255 for threat in margin]
    if grid.margin_extra:
        # Fractions share batch statistics among their adversarial images too, so the coupled loss is as weak.
        cells += [Cell(policy, grid.sweep_size, WHOLE, "pgd", eps, "margin") for policy in deployed
                  for eps in grid.sweep_eps_255]
        cells += [Cell(policy, grid.extra_size, threat, "pgd", top_eps, "margin") for policy in deployed
                  for threat in fractions]
    return list(dict.fromkeys(cells))


@dataclass(frozen=True)
class CellFilter:
    """A slice of the robust cells (``--only-*``): an empty field admits every value."""

    sizes: Sequence[int] = ()
    threats: Sequence[Threat] = ()
    gradients: Sequence[str] = ()
    eps_255: Sequence[float] = ()
    policies: Sequence[Policy] = ()

    def admits(self, cell: Cell) -> bool:
        return ((not self.sizes or cell.n in self.sizes) and (not self.threats or cell.threat in self.threats)
                and (not self.gradients or cell.gradient in self.gradients)
                and (not self.eps_255 or any(abs(cell.eps_255 - e) < 1e-6 for e in self.eps_255))
                and (not self.policies or cell.policy in self.policies))


def attack_images(cell: Cell, robust: bool, subset: int, eot_samples: int = 4) -> int:
    """Images one attack step of ``cell`` runs through the model on a subset of ``subset`` images (per-image
    attacks: the subset once)."""
    if cell.per_image(robust):
        return subset
    images = (subset // cell.threat.attackers_per_batch(cell.n)) * cell.n
    return images * eot_samples if cell.gradient == "unknown" else images


def in_cost_order(cells: list[Cell], robust: bool, subset: int) -> list[Cell]:
    """``cells`` cheapest first: first the cells that reuse per-image attacks (one attack per eps, then forwards
    only), then by images per attack step, then the largest n and eps (the headline's cells). Stable, so a
    policy's twin still follows the cell it copies."""

    def cost(cell: Cell) -> tuple:
        return not cell.per_image(robust), attack_images(cell, robust, subset), -cell.n, -cell.eps_255

    return sorted(cells, key=cost)


def same_computation(done: Cell, cell: Cell, robust: bool) -> bool:
    """Whether ``cell`` repeats ``done``: a policy that resolves to the same statistics at n, and the same
    gradient, or any gradients of the same loss when both attacks ignore batchmates (then each is the
    per-image attack on the frozen model with that loss)."""
    if (done.n, done.threat, done.attack, done.eps_255) != (cell.n, cell.threat, cell.attack, cell.eps_255):
        return False
    if done.policy.resolve(cell.n, robust) != cell.policy.resolve(cell.n, robust):
        return False
    if done.gradient == cell.gradient:
        return True
    return (not cell.threat.poisoning and done.loss == cell.loss
            and done.ignores_batchmates(robust) and cell.ignores_batchmates(robust))
