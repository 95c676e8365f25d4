"""When batch drift is scored (the ``drift_metrics`` setting): after the answers by default, inline, sampled or
off. Whatever it says, each image's drift score is in its answer and the predictions are the same."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from service_support import LiveServer, Sample, serve

from service.app import create_app
from service.predictor import RateBudget
from service.settings import Settings

BATCHES = 6
IMAGES = 4  # per request: one request is one batch, sent one after another


def start(model_dir: Path, mode: str, **extra: float) -> Iterator[tuple[LiveServer, CollectorRegistry]]:
    settings = Settings(model=str(model_dir), device="cpu", max_batch_size=8, drift_metrics=mode, **extra)
    registry = CollectorRegistry()
    for server in serve(create_app(settings, registry=registry)):
        yield server, registry


@pytest.fixture(scope="module", params=["after", "inline", "sampled:0.5", "off"])
def served(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[tuple[str, LiveServer, CollectorRegistry]]:
    for server, registry in start(model_dir, request.param):
        yield request.param, server, registry


def send(server: LiveServer, samples: list[Sample]) -> list[dict]:
    answers = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for b in range(BATCHES):
            files = [("image", (f"{i}.png", s.png, "image/png")) for i, s in enumerate(samples[b * IMAGES:][:IMAGES])]
            response = client.post("/predict", files=files)
            assert response.status_code == 200, response.text
            answers.append(response.json())
    return answers


def scored_count(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("robustnorm_drift_batches_total", {"outcome": outcome}) or 0.0


def settle(registry: CollectorRegistry, expected: float, timeout: float = 10.0) -> None:
    until = time.monotonic() + timeout
    while scored_count(registry, "scored") < expected and time.monotonic() < until:
        time.sleep(0.02)


def test_batch_drift_is_scored_as_the_setting_says(served: tuple[str, LiveServer, CollectorRegistry],
                                                   cifar_samples: list[Sample]) -> None:
    mode, server, registry = served
    before = {outcome: scored_count(registry, outcome) for outcome in ("scored", "sampled_out", "skipped")}
    batch_scores_before = registry.get_sample_value("robustnorm_batch_drift_score_count") or 0.0
    answers = send(server, cifar_samples[40:])
    expected = {"after": BATCHES, "inline": BATCHES, "sampled:0.5": BATCHES // 2, "off": 0}[mode]
    settle(registry, before["scored"] + expected)
    scored = scored_count(registry, "scored") - before["scored"]
    sampled_out = scored_count(registry, "sampled_out") - before["sampled_out"]
    skipped = scored_count(registry, "skipped") - before["skipped"]
    assert skipped == 0, "one request at a time never leaves the scoring thread behind"
    assert (scored, sampled_out) == (expected, BATCHES - expected), mode
    assert (registry.get_sample_value("robustnorm_batch_drift_score_count") or 0.0) - batch_scores_before == expected
    for answer in answers:
        for prediction in answer["predictions"]:
            assert isinstance(prediction["drift_score"], float), "image scores are part of every answer"
            assert (prediction["batch"]["drift_score"] is not None) == (mode == "inline"), (mode, prediction)
    latest = httpx.get(f"{server.url}/v1/stats").json()["latest"]
    assert latest["id"] == answers[-1]["predictions"][0]["batch"]["id"]
    if mode in ("after", "inline"):
        assert isinstance(latest["drift_score"], float) and latest["layers"], latest
    if mode == "inline":
        assert latest["drift_score"] == answers[-1]["predictions"][0]["batch"]["drift_score"]
    if mode == "off":
        assert latest["drift_score"] is None and not latest["layers"]


def test_predictions_do_not_depend_on_when_drift_is_scored(model_dir: Path, cifar_samples: list[Sample]) -> None:
    probabilities = {}
    for mode in ("inline", "off"):
        for server, _ in start(model_dir, mode):
            answers = send(server, cifar_samples[80:])
            probabilities[mode] = [[(c["label"], round(c["score"], 5)) for c in p["top_k"]]
                                   for answer in answers for p in answer["predictions"]]
    assert probabilities["inline"] == probabilities["off"]


def test_a_rate_budget_allows_a_seconds_burst_then_its_rate() -> None:
    now = [0.0]
    budget = RateBudget(4.0, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [True] * 4 + [False], "a burst of one second's worth"
    now[0] += 0.5
    assert [budget.take() for _ in range(3)] == [True, True, False], "refilled at 4 per second"
    now[0] += 100
    assert sum(budget.take() for _ in range(10)) == 4, "never more than one second's worth saved up"
    slow = RateBudget(0.5, clock=lambda: now[0])
    assert [slow.take(), slow.take()] == [True, False] and RateBudget(0).take()


def test_drift_scoring_above_its_rate_is_sampled_out(model_dir: Path, cifar_samples: list[Sample]) -> None:
    """``drift_max_rate`` bounds the batches scored per second; the answers are the same for every batch."""
    for server, registry in start(model_dir, "after", drift_max_rate=0.01):  # one token, refilled in 100 s
        answers = send(server, cifar_samples[120:])
        settle(registry, 1)
        time.sleep(0.2)
        assert scored_count(registry, "scored") == 1 and scored_count(registry, "sampled_out") == BATCHES - 1
        assert all(isinstance(p["drift_score"], float) for answer in answers for p in answer["predictions"])
