"""The engine contract: pixels, statistics groups and a policy in; probabilities and one batch report out.

An engine runs one micro-batch at a time on whatever thread calls it (the predictor gives it one thread of
its own). It knows tensors and the library's types, never HTTP: labelling, top-k and response shapes belong
to the schemas, counting to the metrics. Both engines (:mod:`service.engines.torch`,
:mod:`service.engines.onnx`) share what does not depend on the runtime through :class:`EngineBase`: the card,
the policy, the per-stream statistics (:class:`robustnorm.StreamStore`, one per stream policy) and the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch

import robustnorm
from robustnorm.gate import GateCalibration
from robustnorm.policy import Policy
from robustnorm.stream import StreamSelection, StreamStore

logger = logging.getLogger(__name__)


# When a batch's per-layer drift and batch scores are computed: in the engine's run ("now"), later by the caller
# from ``report.pending`` ("later"), or not at all ("none": the engine may skip the statistics only they read).
DriftWhen = Literal["now", "later", "none"]


@dataclass(frozen=True)
class GroupSpec:
    """One statistics group of a micro-batch: ``size`` consecutive images of the pixel tensor, normalised
    together, and the stream they belong to (``None``: the global stream)."""

    size: int
    stream: str | None = None


@dataclass(frozen=True)
class GroupOutcome:
    """What ran for one group."""

    size: int
    statistics: str  # "frozen", "batch", "blend" or "stream"
    fallback: bool  # adaptive fell back, or an auto gate held the population statistics
    stream_images: int  # images the stream estimate held when the group ran (0 without a stream policy)
    batch_score: float | None  # calibrated batch drift score, None where there is no calibration for the policy
    gate_score: float | None = None  # the auto gate's score of the group's stream (None: no gate, or too few images)


@dataclass(frozen=True)
class BatchDrift:
    """The drift of one forward pass for monitoring: per layer and measure one value per group, and each group's
    calibrated batch score (None where the policy has no calibration)."""

    layers: dict[str, dict[str, list[float]]]
    batch_scores: list[float | None]


class PendingDrift:
    """A forward's recorded statistics, scored later (:meth:`compute`) so that answers need not wait for it."""

    def __init__(self, run: robustnorm.GroupRun, calibration: robustnorm.DriftCalibration | None,
                 scored: list[bool]) -> None:
        self._run, self._calibration, self._scored = run, calibration, scored

    def compute(self) -> BatchDrift:
        """Per-layer drift and batch scores: a few dozen small tensor operations, whatever the batch size."""
        drift = robustnorm.drift_report(self._run, self._calibration, images=False)
        scores = [score if g < len(drift.batch_score) and self._scored[g] else None
                  for g, score in enumerate(drift.batch_score or [None] * len(self._scored))]
        return BatchDrift(layers=drift.layers, batch_scores=scores)


@dataclass(frozen=True)
class BatchReport:
    """One forward pass: its groups, image scores and, once scored, per-layer drift (layer -> measure -> one
    value per group) and each group's batch score. ``pending`` holds what is still to score (see
    :meth:`Engine.run`'s ``score``); :meth:`with_drift` fills it in."""

    groups: list[GroupOutcome]
    layers: dict[str, dict[str, list[float]]]
    image_scores: list[float | None] | None
    seconds: float
    padded_to: int
    switches: list[tuple[str, bool]] = field(default_factory=list)  # gate switches: (stream key, shifted)
    repeated_images: int = 0  # images that did not join their stream: it held a copy of them already
    pending: PendingDrift | None = field(default=None, compare=False, repr=False)

    @property
    def images(self) -> int:
        return sum(group.size for group in self.groups)

    def with_drift(self, drift: BatchDrift) -> BatchReport:
        """This report with its drift scored."""
        groups = [replace(group, batch_score=score) for group, score in zip(self.groups, drift.batch_scores)]
        return replace(self, groups=groups, layers=drift.layers, pending=None)


class Engine(Protocol):
    """What the predictor needs of an engine."""

    card: robustnorm.ModelCard
    device: torch.device
    policy: Policy
    labels: list[str]
    pad_sizes: tuple[int, ...]

    def run(self, pixels: torch.Tensor, groups: Sequence[GroupSpec], policy: Policy, *, drift: DriftWhen = "now"
            ) -> tuple[torch.Tensor, BatchReport]:
        """Probabilities of the real images (on the CPU) and the batch report. The statistics the policy and
        its gate need, and each image's drift score, are computed in the forward; the per-layer drift and the
        batch scores too with ``drift="now"``; with "later" they are left in ``report.pending`` for the caller
        to compute after the answers have left; with "none" they are not computed at all."""
    def warm_up(self) -> None: ...
    def close(self) -> None: ...
    def drift_calibration(self, policy: Policy) -> robustnorm.DriftCalibration | None: ...
    def reset_streams(self, keys: Sequence[str] | None = None) -> int: ...
    def stream_count(self) -> int: ...


@dataclass(frozen=True)
class StreamSettings:
    """Bounds of the per-stream state (the service's ``stream_*`` settings)."""

    max_streams: int = 256
    idle_seconds: float = 3600.0
    max_batch_share: float = 0.25
    trim: float = 0.0


class EngineBase:
    """What both engines share: card, policy, streams, calibration and the report."""

    def __init__(self, card: robustnorm.ModelCard, policy: Policy, streams: StreamSettings) -> None:
        self.card = card
        self.policy = policy
        self.labels = list(card.labels)
        self.stream_settings = streams
        self._stores: dict[str, StreamStore] = {}
        calibration = card.calibration
        self.calibrated_policy = robustnorm.parse_policy(
            calibration.policy if calibration is not None and calibration.policy else card.policy)
        self.gate = (GateCalibration.from_dict(calibration.gate)
                     if calibration is not None and calibration.gate else None)
        if policy.kind == "auto" and self.gate is None:
            logger.warning("policy %s needs a drift gate calibration, which the card of %s lacks: the gate never "
                           "switches, so every batch runs population statistics; calibrate the model", policy,
                           card.name)

    def drift_calibration(self, policy: Policy) -> robustnorm.DriftCalibration | None:
        """The card's drift calibration for a batch run under ``policy``, or ``None`` (no scores).

        A calibration is made under one policy, and only there do clean batches score about 0; a misleading
        score is worse than none, so other policies report per-layer drift only (docs/drift.md). A calibration
        made under ``frozen`` also scores the ``auto`` policy's groups while its gate holds the population
        statistics (they run ``frozen``), and only those.
        """
        if self.card.calibration is None:
            return None
        if policy == self.calibrated_policy or (policy.kind == "auto" and self.calibrated_policy.kind == "frozen"):
            return self.card.calibration
        return None

    def streams_for(self, policy: Policy, groups: Sequence[GroupSpec]) -> StreamSelection | None:
        """Each group's stream under a stream policy (one store per policy), else None."""
        if not policy.uses_streams:
            return None
        key = str(policy)
        store = self._stores.get(key)
        if store is None:
            assert policy.window is not None
            settings = self.stream_settings
            store = StreamStore(policy.window, max_streams=settings.max_streams, idle_seconds=settings.idle_seconds,
                                max_batch_share=settings.max_batch_share, trim=settings.trim, gate=self.gate)
            self._stores[key] = store
        return store.select([group.stream for group in groups])

    def reset_streams(self, keys: Sequence[str] | None = None) -> int:
        """Forget the given streams (every stream when ``keys`` is None) in every store; how many were dropped."""
        return sum(store.reset(keys) for store in list(self._stores.values()))

    def stream_count(self) -> int:
        return sum(len(store) for store in list(self._stores.values()))

    def report(self, run: robustnorm.GroupRun, groups: Sequence[GroupSpec], policy: Policy, seconds: float,
               padded_to: int, selection: StreamSelection | None, drift: DriftWhen = "now") -> BatchReport:
        """The batch report of a recorded grouped forward, its drift scored now, left pending or not at all."""
        calibration = self.drift_calibration(policy)
        scored = [policy.kind != "auto" or ran == "frozen" for ran in run.ran]  # see drift_calibration
        streams = selection.streams if selection is not None else [None] * len(groups)
        outcomes = [GroupOutcome(size=group.size, statistics=run.ran[g], fallback=run.fallback[g],
                                 stream_images=run.stream_images[g] if run.stream_images else 0, batch_score=None,
                                 gate_score=stream.gate_score if stream is not None else None)
                    for g, (group, stream) in enumerate(zip(groups, streams))]
        image_scores: list[float | None] | None = (
            list(robustnorm.image_scores(run, calibration)) if calibration is not None and run.stats and any(scored)
            else None)
        if image_scores is not None and not all(scored):
            keep = [scored[g] for g, group in enumerate(groups) for _ in range(group.size)]
            image_scores = [score if kept else None for score, kept in zip(image_scores, keep)]
        for key, shifted in selection.switched if selection is not None else ():
            logger.info("drift gate of stream %r switched to %s statistics", key or "global",
                        "stream" if shifted else "population")
        pending = PendingDrift(run, calibration, scored) if drift != "none" else None
        report = BatchReport(groups=outcomes, layers={}, image_scores=image_scores, seconds=seconds,
                             padded_to=padded_to, switches=list(selection.switched) if selection is not None else [],
                             repeated_images=selection.repeated if selection is not None else 0, pending=pending)
        return report.with_drift(pending.compute()) if pending is not None and drift == "now" else report
