"""Threat models, parsed once from their strings, and the attacks' gradients and losses.

Threat models (``docs/evaluation.md``), written as in the results file:

- ``whole``: every image of the batch is adversarial (the paper's setting);
- ``lone``: one adversarial image among n - 1 clean ones (what a public service sees);
- ``fraction:F``: ``max(1, round(F * n))`` adversarial images per batch of n, ``0 < F <= 1``;
- ``poison:K``: K images per batch crafted to make the *other* n - K images misclassified.

``str(parse_threat(text))`` is the canonical string (``fraction:0.50`` becomes ``fraction:0.5``).
Gradients: ``adaptive`` (through the model as deployed), ``margin`` (the same, on the clamped margin loss),
``transfer`` (crafted against the ``frozen`` model) and ``unknown`` (a lone attacker who does not know its
batchmates: expectation over freshly drawn clean batchmates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..attacks import fraction_mask, lone_attacker_mask

ThreatKind = Literal["whole", "lone", "fraction", "poison"]
ATTACKS = ("fgsm", "pgd")
GRADIENTS = ("adaptive", "margin", "transfer", "unknown")
VALID_THREATS = "whole, lone, fraction:F (0 < F <= 1) or poison:K (K >= 1)"


@dataclass(frozen=True)
class Threat:
    """A parsed threat model (module docstring). Build one with :func:`parse_threat`."""

    kind: ThreatKind
    fraction: float | None = None  # fraction:F
    poisoners: int | None = None  # poison:K

    def __str__(self) -> str:
        if self.kind == "fraction":
            assert self.fraction is not None
            return f"fraction:{_format_number(self.fraction)}"
        if self.kind == "poison":
            return f"poison:{self.poisoners}"
        return self.kind

    @property
    def poisoning(self) -> bool:
        """Whether the attacker's images aim at their clean batchmates (scored on those) instead of themselves."""
        return self.kind == "poison"

    def attackers_per_batch(self, n: int) -> int:
        """How many images of a batch of ``n`` the attacker controls."""
        if self.kind == "whole":
            return n
        if self.kind == "lone":
            return 1
        if self.kind == "fraction":
            assert self.fraction is not None
            return max(1, round(self.fraction * n))
        assert self.poisoners is not None
        if self.poisoners >= n:
            raise ValueError(f"poisoning with {self.poisoners} attackers needs batches larger than {self.poisoners}")
        return self.poisoners

    def masks(self, groups: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """``(mask, loss_mask)`` over ``groups`` consecutive batches of ``n``: the attacker's images, at random
        positions in each batch, and the images whose loss it raises when those are others (poisoning: the
        victims), else ``None``."""
        if self.kind == "whole":
            return torch.ones(groups * n, dtype=torch.bool), None
        if self.kind == "lone":
            return lone_attacker_mask(groups, n, generator), None
        k = self.attackers_per_batch(n)
        mask = fraction_mask(groups, n, k / n, generator)
        return mask, (~mask if self.poisoning else None)


WHOLE = Threat("whole")
LONE = Threat("lone")


def parse_threat(threat: str | Threat) -> Threat:
    """Parse a threat model's string (or pass a :class:`Threat` through); ``ValueError`` when malformed."""
    if isinstance(threat, Threat):
        return threat
    head, _, value = threat.strip().lower().partition(":")
    try:
        if head in ("whole", "lone") and not value:
            return Threat(head)  # type: ignore[arg-type]
        if head == "fraction" and 0 < float(value) <= 1:
            return Threat("fraction", fraction=float(value))
        if head == "poison" and int(value) >= 1:
            return Threat("poison", poisoners=int(value))
    except ValueError:
        pass
    raise ValueError(f"unknown threat model {threat!r}; use {VALID_THREATS}")


def loss_of(gradient: str) -> str:
    """The loss an attack raises (:func:`robustnorm.attacks.image_losses`): the clamped margin for the ``margin``
    gradient, cross-entropy otherwise."""
    return "margin" if gradient == "margin" else "ce"


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
