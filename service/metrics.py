"""Prometheus metrics of the service: the fixed names of docs/architecture.md, on an injected registry.

One :class:`Metrics` object per service, registered on the ``CollectorRegistry`` it is given (tests use a
fresh one, so several apps can live in one process). Units are base units (seconds); label values come only
from bounded sets: route templates, status codes, layer names, policies, rejection reasons.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .engines import BatchReport

STATISTICS = ("batch", "blend", "frozen", "stream")
REJECTION_REASONS = ("queue_full", "deadline", "too_large", "too_many_images", "bad_image", "unsupported_type",
                     "invalid", "unauthorized", "body_timeout", "uploads_full", "overloaded", "tenant_share",
                     "tenant_rate")
# Where work past its deadline was dropped: in the queue (before the engine: the deadline passed, or too little
# time was left for a batch) or at answer time (the answer was ready after the deadline: 504, never a late 200).
LATE_STAGES = ("queue", "answer")
DRIFT_OUTCOMES = ("scored", "sampled_out", "skipped")
CLIENT_GONE = 499  # the status code counted for a request whose client hung up before its answer (nginx's)

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Calibrated batch score: about 0 with unit spread on clean batches (robustnorm.drift); 3 is a 3-sigma event.
BATCH_SCORE_BUCKETS = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 50.0)
# Image score: raw / (99th percentile on clean images), so about 1% of clean images score above 1.
IMAGE_SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 25.0, 100.0)


# Gate score: the mean over a stream's window of each image's raw score against clean images of its predicted
# class (robustnorm.gate), about 1 on clean traffic; calibrated thresholds sit near 1.3-1.6.
GATE_SCORE_BUCKETS = (0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 3.0, 5.0, 10.0, 30.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to the max batch size (which is always a bucket of its own)."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


class Metrics:
    """Every metric of the service, created on ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, max_batch_size: int) -> None:
        self.registry = registry
        self.requests = Counter("robustnorm_requests_total", "HTTP requests answered.", ["route", "code"],
                                registry=registry)
        self.request_duration = Histogram("robustnorm_request_duration_seconds", "Time to answer an HTTP request.",
                                          ["route"], buckets=REQUEST_BUCKETS, registry=registry)
        self.queue_depth = Gauge("robustnorm_queue_depth", "Images waiting for a batch.", registry=registry)
        self.queue_wait = Histogram("robustnorm_queue_wait_seconds", "Time images waited before their batch ran.",
                                    buckets=QUEUE_WAIT_BUCKETS, registry=registry)
        self.batch_size = Histogram("robustnorm_batch_size", "Real images per batch (padding excluded).",
                                    buckets=batch_size_buckets(max_batch_size), registry=registry)
        self.inference_duration = Histogram("robustnorm_inference_duration_seconds",
                                            "Time of one batch's forward pass with its image scores (the "
                                            "per-layer drift is scored after the answers unless drift_metrics "
                                            "is inline).",
                                            buckets=INFERENCE_BUCKETS, registry=registry)
        self.batches = Counter("robustnorm_batches_total",
                               "Statistics groups run, by the statistics that ran and whether adaptive fell back.",
                               ["statistics", "fallback"], registry=registry)
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}  # (metric, label values) -> child
        self.layer_drift = Gauge("robustnorm_layer_drift", "Drift of the latest batch per norm layer and measure.",
                                 ["layer", "measure"], registry=registry)
        self.batch_drift_score = Histogram("robustnorm_batch_drift_score", "Calibrated drift score per batch.",
                                           buckets=BATCH_SCORE_BUCKETS, registry=registry)
        self.image_drift_score = Histogram("robustnorm_image_drift_score", "Calibrated drift score per image.",
                                           buckets=IMAGE_SCORE_BUCKETS, registry=registry)
        self.rejected = Counter("robustnorm_rejected_total", "Requests rejected, by reason.", ["reason"],
                                registry=registry)
        self.header_timeouts = Counter("robustnorm_header_timeouts_total",
                                       "Connections closed because a request's headers did not arrive in time.",
                                       registry=registry)
        self.gate_switches = Counter("robustnorm_gate_switches_total",
                                     "Drift gate switches of the auto policy, by the statistics switched to.",
                                     ["to"], registry=registry)
        self.gate_score = Histogram("robustnorm_gate_score",
                                    "The auto gate's score of the stream each batch ran in (clean traffic: about 1).",
                                    buckets=GATE_SCORE_BUCKETS, registry=registry)
        self.drift_batches = Counter("robustnorm_drift_batches_total",
                                     "Batches by what became of their drift scoring: scored, sampled out, or "
                                     "skipped because the scoring thread was behind.", ["outcome"],
                                     registry=registry)
        self.late_images = Counter("robustnorm_late_dropped_images_total",
                                   "Images dropped because their request's deadline passed or could not be met.",
                                   ["stage"], registry=registry)
        self.late_requests = Counter("robustnorm_late_dropped_requests_total",
                                     "Requests answered 504 because their deadline passed or could not be met "
                                     "while their images waited or ran.", ["stage"], registry=registry)
        self.streams = Gauge("robustnorm_streams", "Streams whose running statistics the service holds.",
                             registry=registry)
        self.repeated_images = Counter("robustnorm_stream_repeated_images_total",
                                       "Images that did not join their stream because it held a copy of them "
                                       "already (clients sending one image again and again).", registry=registry)
        self.model_info = Gauge("robustnorm_model_info", "The model being served (always 1).",
                                ["model", "version", "norm", "policy"], registry=registry)
        for statistics in STATISTICS:  # so that rate() sees every series from the start
            for fallback in ("true", "false"):
                self.batches.labels(statistics, fallback)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for target in ("stream", "population"):
            self.gate_switches.labels(target)
        for stage in LATE_STAGES:
            self.late_images.labels(stage)
            self.late_requests.labels(stage)
        for outcome in DRIFT_OUTCOMES:
            self.drift_batches.labels(outcome)

    def set_model(self, *, model: str, version: str, norm: str, policy: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model, version, norm, policy).set(1)

    def _child(self, metric: Counter | Gauge | Histogram, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept once made: labels() costs a lookup under a lock, on paths every request
        or batch takes."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self._child(self.requests, route, str(code)).inc()
        self._child(self.request_duration, route).observe(seconds)

    def reject(self, reason: str) -> None:
        self._child(self.rejected, reason).inc()

    def drop_late(self, stage: str, images: int, requests: int = 1) -> None:
        self.late_images.labels(stage).inc(images)
        self.late_requests.labels(stage).inc(requests)

    def observe_batch(self, report: BatchReport) -> None:
        """One forward pass: its size and time, per statistics group what ran, the gate, the image scores."""
        self.batch_size.observe(report.images)
        self.inference_duration.observe(report.seconds)
        for group in report.groups:
            self.batches.labels(group.statistics, "true" if group.fallback else "false").inc()
            if group.gate_score is not None:
                self.gate_score.observe(group.gate_score)
        for score in report.image_scores or ():
            if score is not None:
                self.image_drift_score.observe(score)
        for _, shifted in report.switches:
            self.gate_switches.labels("stream" if shifted else "population").inc()
        if report.repeated_images:
            self.repeated_images.inc(report.repeated_images)

    def observe_drift(self, report: BatchReport) -> None:
        """A forward pass's drift once scored: each group's batch score and the per-layer drift."""
        self.drift_batches.labels("scored").inc()
        for group in report.groups:
            if group.batch_score is not None:
                self.batch_drift_score.observe(group.batch_score)
        for layer, measures in report.layers.items():
            for measure, per_group in measures.items():
                if per_group:  # the latest batch is the last group of this forward
                    self._child(self.layer_drift, layer, measure).set(per_group[-1])

    def drift_not_scored(self, outcome: str) -> None:
        self.drift_batches.labels(outcome).inc()

    def set_streams(self, count: int) -> None:
        self.streams.set(count)
