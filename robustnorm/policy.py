"""Statistics policies: which statistics a normalization layer uses at inference time.

A policy is written as a string so that a model card, an environment variable or an HTTP parameter can
carry it; :func:`parse_policy` turns it into a :class:`Policy` once, at the edge, and everything below passes
that object (see ``docs/architecture.md``, "Statistics policies"):

- ``frozen``: the layer's running (population) statistics, i.e. ordinary eval mode;
- ``batch``: the statistics of the ``n`` real images of the batch (or of the group);
- ``blend:N0``: population and batch statistics mixed with prior strength ``N0`` (Schneider et al. 2020);
- ``adaptive:MIN_BATCH`` and ``adaptive:MIN_BATCH:FALLBACK``: ``batch`` when ``n >= MIN_BATCH``, else
  ``FALLBACK`` (``frozen`` or ``blend:N0``). Without an explicit fallback, RobustNorm layers fall back to
  ``frozen`` (RobustNorm's tracked statistics) and BatchNorm layers to ``blend:16``;
- ``stream:WINDOW`` and ``stream:WINDOW:N0``: the population (prior strength ``N0``, default 16), the recent
  traffic of the group's stream (up to ``WINDOW`` images, :mod:`robustnorm.stream`) and the batch, mixed in
  proportion to their image counts, so that single images adapt too;
- ``auto:WINDOW`` and ``auto:WINDOW:N0``: ``frozen`` while the stream's drift gate says the traffic is in
  distribution, the ``stream`` statistics once it says the traffic has shifted.

:meth:`Policy.plan` is the one place that decides, for the groups of a forward, which statistics run and
with which weights; the layers, the grouped run and the ONNX engine all read its :class:`GroupPlan` s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

PolicyKind = Literal["frozen", "batch", "blend", "adaptive", "stream", "auto"]
StatisticsKind = Literal["frozen", "batch", "blend", "stream"]

VALID_FORMS = ("'frozen', 'batch', 'blend:N0' (N0 > 0), 'adaptive:MIN_BATCH', 'adaptive:MIN_BATCH:FALLBACK', "
               "'stream:WINDOW', 'stream:WINDOW:N0', 'auto:WINDOW' or 'auto:WINDOW:N0'")
DEFAULT_BN_FALLBACK_N0 = 16.0
DEFAULT_STREAM_N0 = 16.0
STREAM_KINDS = ("stream", "auto")


class StreamView(Protocol):
    """What planning needs to know of a stream: how many images its estimate holds and whether its gate
    says the traffic has shifted (:class:`robustnorm.stream.Stream` is one)."""

    @property
    def count(self) -> int: ...
    @property
    def shifted(self) -> bool: ...


@dataclass(frozen=True)
class GroupPlan:
    """What one group of a forward runs: the kind of statistics and the weight of each source.

    The layer normalises with ``population_weight * population + stream_weight * stream + batch_weight * batch``
    (means and spreads alike); the three weights add up to 1.
    """

    statistics: StatisticsKind
    batch_weight: float
    stream_weight: float = 0.0
    fallback: bool = False  # an adaptive policy fell back, or an auto gate held the population statistics
    stream_images: int = 0  # images the stream estimate held when the group ran

    @property
    def population_weight(self) -> float:
        return 1.0 - self.batch_weight - self.stream_weight

    @property
    def uses_batch(self) -> bool:
        return self.batch_weight > 0.0

    @property
    def population_only(self) -> bool:
        """The population statistics alone: what a model folded for frozen statistics runs."""
        return self.statistics == "frozen" and not self.batch_weight and not self.stream_weight


FROZEN_PLAN = GroupPlan("frozen", 0.0)


@dataclass(frozen=True)
class Policy:
    """A parsed statistics policy. Build one with :func:`parse_policy`."""

    kind: PolicyKind
    n0: float | None = None
    min_batch: int | None = None
    fallback: Policy | None = None
    window: int | None = None

    def __str__(self) -> str:
        if self.kind == "blend":
            return f"blend:{_format_number(self.n0)}"
        if self.kind == "adaptive":
            text = f"adaptive:{self.min_batch}"
            return text if self.fallback is None else f"{text}:{self.fallback}"
        if self.kind in STREAM_KINDS:
            text = f"{self.kind}:{self.window}"
            return text if self.n0 == DEFAULT_STREAM_N0 else f"{text}:{_format_number(self.n0)}"
        return self.kind

    @property
    def uses_streams(self) -> bool:
        """Whether the policy reads and updates per-stream running statistics."""
        return self.kind in STREAM_KINDS

    def resolve(self, n: int, robust: bool) -> Policy:
        """The concrete policy (``frozen``, ``batch`` or ``blend``) an adaptive policy runs for ``n`` images.

        ``robust`` says whether the layer is a RobustNorm layer, which decides the default fallback.
        Stream policies are planned with :meth:`plan`, which knows their streams.
        """
        if self.kind != "adaptive":
            return self
        assert self.min_batch is not None
        if n >= self.min_batch:
            return BATCH
        if self.fallback is not None:
            return self.fallback
        return FROZEN if robust else Policy("blend", n0=DEFAULT_BN_FALLBACK_N0)

    def plan(self, sizes: Sequence[int], robust: bool, streams: Sequence[StreamView | None] | None = None
             ) -> list[GroupPlan]:
        """What each group of ``sizes`` real images runs.

        ``streams`` gives each group's stream (stream policies; ``None`` or a missing stream is an empty one).
        """
        plans = []
        for g, n in enumerate(sizes):
            stream = streams[g] if streams is not None and g < len(streams) else None
            plans.append(self._plan_group(int(n), robust, stream))
        return plans

    def _plan_group(self, n: int, robust: bool, stream: StreamView | None) -> GroupPlan:
        if self.kind == "frozen":
            return FROZEN_PLAN
        if self.kind == "batch":
            return GroupPlan("batch", 1.0)
        if self.kind == "blend":
            assert self.n0 is not None
            return GroupPlan("blend", n / (self.n0 + n))
        if self.kind == "adaptive":
            concrete = self.resolve(n, robust)
            plan = concrete._plan_group(n, robust, None)
            return GroupPlan(plan.statistics, plan.batch_weight, fallback=concrete.kind != "batch")
        assert self.n0 is not None
        held = stream.count if stream is not None else 0
        if self.kind == "auto" and not (stream is not None and stream.shifted):
            return GroupPlan("frozen", 0.0, fallback=True, stream_images=held)
        total = self.n0 + held + n
        return GroupPlan("stream", n / total, held / total, stream_images=held)


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


def _parse_count(text: str, whole: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _invalid(whole, f"{what} {text!r} is not an integer") from None
    if value < 1:
        raise _invalid(whole, f"{what} must be >= 1")
    return value


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
    if head in STREAM_KINDS:
        if len(parts) not in (2, 3):
            raise _invalid(policy, f"{head!r} takes WINDOW and an optional N0")
        window = _parse_count(parts[1], policy, "WINDOW")
        n0 = _parse_n0(parts[2], policy) if len(parts) == 3 else DEFAULT_STREAM_N0
        return Policy(head, n0=n0, window=window)  # type: ignore[arg-type]
    if head == "adaptive":
        if len(parts) < 2:
            raise _invalid(policy, "'adaptive' needs MIN_BATCH")
        min_batch = _parse_count(parts[1], policy, "MIN_BATCH")
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
