"""Statistics policies: which statistics a normalization layer uses at inference time.

A policy is written as a string so that a model card, an environment variable or an HTTP parameter can
carry it (see ARCHITECTURE.md, "Statistics policies"):

- ``frozen``: the layer's running (population) statistics, i.e. ordinary eval mode;
- ``batch``: the statistics of the ``n`` real images of the batch (or of the group);
- ``blend:N0``: population and batch statistics mixed with prior strength ``N0`` (Schneider et al. 2020);
- ``adaptive:MIN_BATCH`` and ``adaptive:MIN_BATCH:FALLBACK``: ``batch`` when ``n >= MIN_BATCH``, else
  ``FALLBACK`` (``frozen`` or ``blend:N0``). Without an explicit fallback, RobustNorm layers fall back to
  ``frozen`` (RobustNorm's tracked statistics) and BatchNorm layers to ``blend:16``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PolicyKind = Literal["frozen", "batch", "blend", "adaptive"]
StatisticsKind = Literal["frozen", "batch", "blend"]

VALID_FORMS = "'frozen', 'batch', 'blend:N0' (N0 > 0), 'adaptive:MIN_BATCH' or 'adaptive:MIN_BATCH:FALLBACK'"
DEFAULT_BN_FALLBACK_N0 = 16.0


@dataclass(frozen=True)
class Policy:
    """A parsed statistics policy. Build one with :func:`parse_policy`."""

    kind: PolicyKind
    n0: float | None = None
    min_batch: int | None = None
    fallback: Policy | None = None

    def __str__(self) -> str:
        if self.kind == "blend":
            return f"blend:{_format_number(self.n0)}"
        if self.kind == "adaptive":
            text = f"adaptive:{self.min_batch}"
            return text if self.fallback is None else f"{text}:{self.fallback}"
        return self.kind

    def resolve(self, n: int, robust: bool) -> Policy:
        """The concrete policy (``frozen``, ``batch`` or ``blend``) a layer runs for a group of ``n`` images.

        ``robust`` says whether the layer is a RobustNorm layer, which decides the default fallback.
        """
        if self.kind != "adaptive":
            return self
        assert self.min_batch is not None
        if n >= self.min_batch:
            return BATCH
        if self.fallback is not None:
            return self.fallback
        return FROZEN if robust else Policy("blend", n0=DEFAULT_BN_FALLBACK_N0)


FROZEN = Policy("frozen")
BATCH = Policy("batch")


def _format_number(value: float | None) -> str:
    assert value is not None
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _invalid(text: str, why: str) -> ValueError:
    return ValueError(f"invalid statistics policy {text!r}: {why}; valid forms are {VALID_FORMS}")


def _parse_n0(text: str, whole: str) -> float:
    try:
        n0 = float(text)
    except ValueError:
        raise _invalid(whole, f"N0 {text!r} is not a number") from None
    if not n0 > 0 or n0 == float("inf"):
        raise _invalid(whole, "N0 must be a finite number > 0")
    return n0


def parse_policy(policy: str | Policy) -> Policy:
    """Parse a policy string (or pass a :class:`Policy` through). Raises ``ValueError`` when malformed."""
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise TypeError(f"a statistics policy is a string, got {type(policy).__name__}")
    text = policy.strip().lower()
    parts = text.split(":")
    head = parts[0]
    if head in ("frozen", "batch"):
        if len(parts) != 1:
            raise _invalid(policy, f"{head!r} takes no parameter")
        return FROZEN if head == "frozen" else BATCH
    if head == "blend":
        if len(parts) != 2:
            raise _invalid(policy, "'blend' takes exactly one parameter N0")
        return Policy("blend", n0=_parse_n0(parts[1], policy))
    if head == "adaptive":
        if len(parts) < 2:
            raise _invalid(policy, "'adaptive' needs MIN_BATCH")
        try:
            min_batch = int(parts[1])
        except ValueError:
            raise _invalid(policy, f"MIN_BATCH {parts[1]!r} is not an integer") from None
        if min_batch < 1:
            raise _invalid(policy, "MIN_BATCH must be >= 1")
        fallback: Policy | None = None
        if len(parts) > 2:
            fallback_text = ":".join(parts[2:])
            if fallback_text == "frozen":
                fallback = FROZEN
            elif parts[2] == "blend" and len(parts) == 4:
                fallback = Policy("blend", n0=_parse_n0(parts[3], policy))
            else:
                raise _invalid(policy, "the fallback must be 'frozen' or 'blend:N0'")
        return Policy("adaptive", min_batch=min_batch, fallback=fallback)
    raise _invalid(policy, f"unknown policy {head!r}")
