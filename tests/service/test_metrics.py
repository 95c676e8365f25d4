"""Metrics: the names and labels of docs/architecture.md on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.engines import BatchReport, GroupOutcome
from service.metrics import Metrics, batch_size_buckets


def test_batch_size_buckets_double_up_to_the_max() -> None:
    assert batch_size_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_size_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert batch_size_buckets(1) == (1,)


def test_two_services_can_live_in_one_process() -> None:
    Metrics(CollectorRegistry(), max_batch_size=8)
    Metrics(CollectorRegistry(), max_batch_size=8)


def test_a_batch_is_recorded_per_statistics_group() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=32)
    metrics.set_model(model="m", version="abc", norm="robustnorm", policy="adaptive:16")
    report = BatchReport(
        groups=[GroupOutcome(16, "batch", False, 0, 0.5), GroupOutcome(4, "frozen", True, 0, None)],
        layers={"bn1": {"mean_shift": [0.1, 0.3], "log_var_ratio": [0.0, 0.2], "kl": [0.01, 0.05]}},
        image_scores=[0.1] * 20, seconds=0.01, padded_to=20, switches=[("", True), ("tenant", True)])
    metrics.observe_batch(report)
    value = registry.get_sample_value
    assert value("robustnorm_batch_drift_score_count") == 0, "batch scores are observed once scored"
    assert value("robustnorm_drift_batches_total", {"outcome": "scored"}) == 0
    metrics.observe_drift(report)
    assert value("robustnorm_drift_batches_total", {"outcome": "scored"}) == 1
    assert value("robustnorm_model_info", {"model": "m", "version": "abc", "norm": "robustnorm",
                                           "policy": "adaptive:16"}) == 1
    assert value("robustnorm_batch_size_bucket", {"le": "16.0"}) == 0
    assert value("robustnorm_batch_size_bucket", {"le": "32.0"}) == 1
    assert value("robustnorm_batches_total", {"statistics": "batch", "fallback": "false"}) == 1
    assert value("robustnorm_batches_total", {"statistics": "frozen", "fallback": "true"}) == 1
    assert value("robustnorm_batches_total", {"statistics": "blend", "fallback": "true"}) == 0
    assert value("robustnorm_batch_drift_score_count") == 1
    assert value("robustnorm_image_drift_score_count") == 20
    assert value("robustnorm_layer_drift", {"layer": "bn1", "measure": "kl"}) == 0.05  # the latest group
    assert value("robustnorm_inference_duration_seconds_count") == 1
    assert value("robustnorm_gate_switches_total", {"to": "stream"}) == 2
    assert value("robustnorm_gate_switches_total", {"to": "population"}) == 0


def test_requests_and_rejections() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_batch_size=8)
    metrics.observe_request("/predict", 429, 0.002)
    metrics.reject("queue_full")
    assert registry.get_sample_value("robustnorm_requests_total", {"route": "/predict", "code": "429"}) == 1
    assert registry.get_sample_value("robustnorm_request_duration_seconds_count", {"route": "/predict"}) == 1
    assert registry.get_sample_value("robustnorm_rejected_total", {"reason": "queue_full"}) == 1
    assert registry.get_sample_value("robustnorm_rejected_total", {"reason": "deadline"}) == 0
