"""A robust cell: one attack under one threat model, on one policy and batch size, and the record it yields.

A :class:`Cell` is what identifies a robust figure in the results file: policy, batch size ``n``, threat model,
attack (``fgsm`` or ``pgd``), eps in 1/255 and gradient. It is immutable and checked when built, so a cell that
cannot be run (an unknown gradient, an unknown-batchmates FGSM, poisoning transferred from the frozen model)
never reaches an attack. :class:`RobustRecord` is the figure one cell yields, as stored (``asdict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..policy import Policy, parse_policy
from .threats import ATTACKS, GRADIENTS, Threat, loss_of, parse_threat

CellKey = tuple[str, int, str, str, float, str]
"""``(policy, n, threat, attack, eps_255, gradient)`` as the results file spells them."""


@dataclass(frozen=True)
class Cell:
    """One robust cell of the grid; build one from strings with :meth:`parse`."""

    policy: Policy
    n: int
    threat: Threat
    attack: str
    eps_255: float
    gradient: str

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"batch size n must be >= 1, got {self.n}")
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}; use {' or '.join(ATTACKS)}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"unknown gradient {self.gradient!r}; use one of {', '.join(GRADIENTS)}")
        if self.gradient == "unknown" and (self.threat.kind != "lone" or self.attack != "pgd"):
            raise ValueError("the unknown-batchmates attacker is PGD, defined for the lone threat with a pool")
        if self.gradient == "transfer" and self.threat.poisoning:
            raise ValueError("poisoning crafted on the frozen model has no gradient towards its victims: use an "
                             "adaptive gradient")

    @classmethod
    def parse(cls, policy: str | Policy, n: int, threat: str | Threat, attack: str, eps_255: float,
              gradient: str) -> Cell:
        """A cell from the strings a command line or the results file uses."""
        return cls(parse_policy(policy), int(n), parse_threat(threat), attack, eps_255, gradient)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Cell:
        """The cell a stored record (or its key fields) belongs to."""
        return cls.parse(record["policy"], record["n"], record["threat"], record["attack"], record["eps_255"],
                         record["gradient"])

    @property
    def key(self) -> CellKey:
        """The cell's identity in the results file."""
        return (str(self.policy), self.n, str(self.threat), self.attack, round(self.eps_255, 3), self.gradient)

    @property
    def eps(self) -> float:
        """The L-infinity radius in [0, 1] pixels."""
        return self.eps_255 / 255

    @property
    def loss(self) -> str:
        return loss_of(self.gradient)

    def runs_frozen(self, robust: bool) -> bool:
        """Whether the policy normalises batches of ``n`` with frozen statistics, so that predictions ignore
        batchmates (``robust``: the model's norm layers are RobustNorm, which decides the default fallback)."""
        return self.policy.resolve(self.n, robust).kind == "frozen"

    def ignores_batchmates(self, robust: bool) -> bool:
        """Whether the attack's forward is the frozen model image by image: transfer gradients, or a policy that
        runs frozen statistics at ``n`` (the loss still depends on the gradient: :attr:`loss`)."""
        return self.gradient == "transfer" or self.runs_frozen(robust)

    def per_image(self, robust: bool) -> bool:
        """Whether the cell's attack is the per-image attack on the frozen model (poisoning never is: its
        attackers aim at their batchmates)."""
        return not self.threat.poisoning and self.ignores_batchmates(robust)


def key_of(record: dict[str, Any]) -> CellKey:
    """A stored record's cell key, read as written."""
    return (record["policy"], record["n"], record["threat"], record["attack"], record["eps_255"], record["gradient"])


@dataclass
class RobustRecord:
    """One robust cell's figures, stored as ``asdict(record)``."""

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
