"""Integration tests: the real service under uvicorn on a loopback port, real HTTP, real CIFAR-10 images.

Every answer is checked against the library run offline on the batch the answer reports: the images that
report one batch id (and statistics group) are rebuilt into that batch and run through
``robustnorm.batch_groups``, whose output and recorded statistics must equal what the service answered.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from service_support import MIN_BATCH, TEST_POLICY, LiveServer, Sample, serve
from torch import nn

import robustnorm
from service.app import create_app
from service.settings import MiB, Settings

MAX_BATCH = 32
QUEUE_LIMIT = 64
MAX_IMAGES = 32
MAX_IMAGE_BYTES = 64 * 1024
MAX_PIXELS = 1_000_000
ADMIN_KEY = "admin-key"
ADMIN = {"X-API-Key": ADMIN_KEY}  # /metrics needs it where tenants have keys


@dataclass
class Answer:
    """One image we sent and what the service said about it."""

    sample: Sample
    prediction: dict[str, Any]
    tenant: str | None = None


def _no_server_errors(registry: CollectorRegistry) -> None:
    for family in registry.collect():
        if family.name == "robustnorm_requests":
            failed = [s for s in family.samples if s.name.endswith("_total") and s.labels["code"] == "500"]
            assert not failed, f"the server answered 500: {failed}"


# The servers here run the PyTorch engine, whose answers check_against_offline compares with the offline model;
# the other service tests run the default engine (ONNX Runtime on the CPU where it is installed).
@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[LiveServer]:
    settings = Settings(model=str(model_dir), device="cpu", engine="torch", max_batch_size=MAX_BATCH, max_wait=0.05,
                        queue_limit=QUEUE_LIMIT, max_images_per_request=MAX_IMAGES, max_image_bytes=MAX_IMAGE_BYTES,
                        max_request_bytes=4 * MiB, max_image_pixels=MAX_PIXELS, max_request_pixels=3 * MAX_PIXELS,
                        request_deadline=30)
    registry = CollectorRegistry()
    yield from serve(create_app(settings, registry=registry))
    _no_server_errors(registry)


@pytest.fixture(scope="module")
def tenant_server(model_dir) -> Iterator[LiveServer]:
    """Tenants from API keys, isolated as statistics groups inside shared forward passes; policy overrides on."""
    settings = Settings(model=str(model_dir), device="cpu", engine="torch", max_batch_size=MAX_BATCH, max_wait=0.05,
                        batch_key="api_key", isolation="grouped", api_keys={"key-a": "a", "key-b": "b"},
                        admin_keys={ADMIN_KEY: "ops"}, allow_policy_override=True)
    registry = CollectorRegistry()
    yield from serve(create_app(settings, registry=registry))
    _no_server_errors(registry)


@pytest.fixture(scope="module")
def offline_model(model_dir) -> nn.Module:
    model, card = robustnorm.load_model(model_dir)
    assert card.policy == TEST_POLICY
    return model


# -- sending ------------------------------------------------------------------------------------------------


def _encoded(sample: Sample, image_format: str) -> tuple[bytes, str]:
    return (sample.png, "image/png") if image_format == "png" else (sample.jpeg, "image/jpeg")


async def send(client: httpx.AsyncClient, samples: Sequence[Sample], *, body: str = "multipart",
               image_format: str = "jpeg", params: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
    """POST /predict with the samples as multipart parts, a raw body (one image) or base64 JSON."""
    encoded = [_encoded(sample, image_format) for sample in samples]
    if body == "raw":
        assert len(encoded) == 1
        data, media_type = encoded[0]
        return await client.post("/predict", content=data, params=params,
                                 headers={"content-type": media_type, **(headers or {})})
    if body == "json":
        # Every other image MIME-style, lines wrapped at 76 characters (what `base64` and e-mail libraries write).
        payload = {"images": [(base64.encodebytes if i % 2 else base64.b64encode)(data).decode()
                              for i, (data, _) in enumerate(encoded)]}
        return await client.post("/predict", json=payload, params=params, headers=headers)
    files = [("image", (f"{i}.{image_format}", data, media_type)) for i, (data, media_type) in enumerate(encoded)]
    return await client.post("/predict", files=files, params=params, headers=headers)


def run(coroutine_function, *args: Any) -> Any:
    return asyncio.run(coroutine_function(*args))


def client_for(server: LiveServer) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    return httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits)


def answers_of(response: httpx.Response, samples: Sequence[Sample], tenant: str | None = None) -> list[Answer]:
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(samples)
    return [Answer(sample, prediction, tenant) for sample, prediction in zip(samples, predictions)]


def metric_samples(server: LiveServer, headers: dict[str, str] | None = None
                   ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{server.url}/metrics", headers=headers).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric(server: LiveServer, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    return metric_samples(server, headers).get((name, tuple(sorted(labels.items()))), 0.0)


def stats(server: LiveServer) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/stats")
    assert response.status_code == 200
    return response.json()


# -- checking against the library -------------------------------------------------------------------------


def check_against_offline(model: nn.Module, answers: Sequence[Answer], *, policy: str = TEST_POLICY) -> None:
    """Rebuild every forward pass the answers report and compare with the library's offline output."""
    forwards: dict[str, dict[int, list[Answer]]] = defaultdict(lambda: defaultdict(list))
    for answer in answers:
        batch = answer.prediction["batch"]
        forwards[batch["id"]][batch["group"]].append(answer)
    for batch_id, groups in forwards.items():
        ordered = [groups[g] for g in sorted(groups)]
        for group in ordered:
            reported = {a.prediction["batch"]["size"] for a in group}
            assert reported == {len(group)}, f"batch {batch_id}: sizes {reported}, but we sent {len(group)} images"
        batch_policy = ordered[0][0].prediction["batch"]["policy"]
        robustnorm.set_policy(model, batch_policy)
        pixels = torch.stack([a.sample.pixels() for group in ordered for a in group])
        with torch.inference_mode(), robustnorm.batch_groups(model, [len(g) for g in ordered], record=True) as run:
            probabilities = model(pixels).softmax(dim=1)
        row = 0
        for g, group in enumerate(ordered):
            for answer in group:
                batch = answer.prediction["batch"]
                assert batch["statistics"] == run.ran[g], (batch_id, batch, run.ran)
                assert batch["fallback"] == run.fallback[g]
                expected = probabilities[row]
                top = answer.prediction["top_k"]
                assert answer.prediction["index"] == top[0]["index"]
                for entry in top:
                    assert entry["score"] == pytest.approx(float(expected[entry["index"]]), abs=2e-5)
                assert top[0]["score"] == pytest.approx(float(expected.max()), abs=2e-5)
                row += 1
    robustnorm.set_policy(model, policy)


def noise_png(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def washed_out_png(sample: Sample) -> bytes:
    """The image at 30% contrast over a light background: every pixel shifted towards white."""
    with Image.open(io.BytesIO(sample.jpeg)) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 0.3 + 0.7 * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded_image(size: tuple[int, int], image_format: str, noise: bool = False) -> bytes:
    if noise:
        array = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(array)
    else:
        image = Image.new("RGB", size, (120, 60, 30))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


# -- the tests ----------------------------------------------------------------------------------------------


def test_health_model_card_docs_and_metric_names(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    card = httpx.get(f"{server.url}/v1/model").json()
    assert card["policy"] == card["card_policy"] == TEST_POLICY
    assert card["labels"][0] == "airplane" and card["input_size"] == [3, 32, 32] and card["calibrated"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    schemas = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]
    assert {"PredictResponse", "ErrorResponse", "ModelResponse", "StatsResponse"} <= set(schemas)
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("robustnorm_requests_total", "robustnorm_request_duration_seconds", "robustnorm_queue_depth",
                 "robustnorm_queue_wait_seconds", "robustnorm_batch_size", "robustnorm_inference_duration_seconds",
                 "robustnorm_batches_total", "robustnorm_layer_drift", "robustnorm_batch_drift_score",
                 "robustnorm_image_drift_score", "robustnorm_rejected_total", "robustnorm_model_info"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert metric(server, "robustnorm_model_info", model="test-resnet20-robustnorm", version=card["version"],
                  norm="robustnorm", policy=TEST_POLICY) == 1


def test_concurrent_clients_share_batches_and_match_the_library(server: LiveServer, cifar_samples: list[Sample],
                                                                offline_model: nn.Module) -> None:
    """12 clients, 3 rounds each, 1-3 images per request in every body form; JPEG and PNG."""
    forms = [("multipart", "jpeg"), ("multipart", "png"), ("raw", "jpeg"), ("raw", "png"), ("json", "jpeg")]

    async def client_rounds(client: httpx.AsyncClient, index: int) -> list[Answer]:
        answers = []
        for round_ in range(3):
            body, image_format = forms[(index + round_) % len(forms)]
            count = 1 if body == "raw" else 1 + (index + round_) % 3
            start = (index * 9 + round_ * 3) % (len(cifar_samples) - 3)
            samples = cifar_samples[start:start + count]
            response = await send(client, samples, body=body, image_format=image_format)
            answers += answers_of(response, samples)
        return answers

    async def main() -> list[Answer]:
        async with client_for(server) as client:
            per_client = await asyncio.gather(*(client_rounds(client, i) for i in range(12)))
        return [answer for answers in per_client for answer in answers]

    before = metric(server, "robustnorm_batch_size_bucket", le="1.0"), metric(server, "robustnorm_batch_size_count")
    answers = run(main)
    sizes = [a.prediction["batch"]["size"] for a in answers]
    assert max(sizes) > 1, "no batch larger than 1 formed under concurrency"
    for answer in answers:
        batch = answer.prediction["batch"]
        assert batch["policy"] == TEST_POLICY
        assert batch["fallback"] == (batch["size"] < MIN_BATCH)
        assert batch["statistics"] == ("batch" if batch["size"] >= MIN_BATCH else "frozen")
    check_against_offline(offline_model, answers)
    singles = metric(server, "robustnorm_batch_size_bucket", le="1.0") - before[0]
    batches = metric(server, "robustnorm_batch_size_count") - before[1]
    assert batches > singles, "the robustnorm_batch_size histogram saw no batch larger than 1"
    assert metric(server, "robustnorm_queue_depth") == 0


def test_lone_request_falls_back_and_a_burst_runs_batch_statistics(server: LiveServer, cifar_samples: list[Sample],
                                                                   offline_model: nn.Module) -> None:
    frozen_before = metric(server, "robustnorm_batches_total", statistics="frozen", fallback="true")
    batch_before = metric(server, "robustnorm_batches_total", statistics="batch", fallback="false")

    async def main() -> tuple[list[Answer], list[Answer], list[Answer]]:
        async with client_for(server) as client:
            lone = answers_of(await send(client, cifar_samples[:1], body="raw"), cifar_samples[:1])
            burst_samples = cifar_samples[10:10 + 2 * MIN_BATCH]
            responses = await asyncio.gather(*(send(client, [s], body="raw", image_format="png")
                                               for s in burst_samples))
            burst = [a for r, s in zip(responses, burst_samples) for a in answers_of(r, [s])]
            one_request = cifar_samples[40:40 + MIN_BATCH]
            whole = answers_of(await send(client, one_request), one_request)
        return lone, burst, whole

    lone, burst, whole = run(main)
    lone_batch = lone[0].prediction["batch"]
    assert (lone_batch["size"], lone_batch["statistics"], lone_batch["fallback"]) == (1, "frozen", True)
    assert any(a.prediction["batch"]["size"] >= MIN_BATCH and a.prediction["batch"]["statistics"] == "batch"
               for a in burst), "a concurrent burst of MIN_BATCH images never ran batch statistics"
    assert {a.prediction["batch"]["statistics"] for a in whole} == {"batch"}
    assert {a.prediction["batch"]["id"] for a in whole} == {whole[0].prediction["batch"]["id"]}
    check_against_offline(offline_model, lone + burst + whole)
    assert metric(server, "robustnorm_batches_total", statistics="frozen", fallback="true") > frozen_before
    assert metric(server, "robustnorm_batches_total", statistics="batch", fallback="false") >= batch_before + 2


def scored_stats(server: LiveServer, batch_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """/v1/stats once the batch ``batch_id`` is the latest and its drift has been scored (after its answers)."""
    deadline = time.monotonic() + timeout
    while True:
        snapshot = stats(server)
        latest = snapshot["latest"]
        if latest["id"] == batch_id and latest["drift_score"] is not None and latest["layers"]:
            return snapshot
        assert time.monotonic() < deadline, f"batch {batch_id} was not scored within {timeout} s: {latest}"
        time.sleep(0.02)


def test_drift_rises_on_shifted_images(server: LiveServer, cifar_samples: list[Sample]) -> None:
    """Noise moves the batch statistics (layer drift, batch score); washed-out images move each image's
    early features (image score). The answers carry the image scores; /v1/stats and the Prometheus metrics
    show the batch drift, scored after the answers left."""
    clean = [sample.png for sample in cifar_samples[100:132]]
    noise = [noise_png(seed) for seed in range(32)]
    washed_out = [washed_out_png(sample) for sample in cifar_samples[100:132]]

    async def main() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        results = []
        async with client_for(server) as client:
            for images in (clean, noise, washed_out):
                files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
                response = await client.post("/predict", files=files)
                assert response.status_code == 200, response.text
                answer = response.json()
                assert answer["predictions"][0]["batch"]["drift_score"] is None, "scored after the answers"
                results.append((answer, scored_stats(server, answer["predictions"][0]["batch"]["id"])))
        return results

    scores_before = metric(server, "robustnorm_batch_drift_score_count")
    images_before = metric(server, "robustnorm_image_drift_score_count")
    (clean_answer, clean_stats), (noise_answer, noise_stats), (washed_answer, washed_stats) = run(main)
    for answer, snapshot in ((clean_answer, clean_stats), (noise_answer, noise_stats)):
        batch = answer["predictions"][0]["batch"]
        assert snapshot["latest"]["id"] == batch["id"] and snapshot["latest"]["size"] == 32

    def mean_kl(snapshot: dict[str, Any]) -> float:
        layers = snapshot["latest"]["layers"]
        return sum(layer["kl"] for layer in layers.values()) / len(layers)

    def median_image_score(answer: dict[str, Any]) -> float:
        return float(np.median([p["drift_score"] for p in answer["predictions"]]))

    assert mean_kl(noise_stats) > 3 * mean_kl(clean_stats)
    assert abs(clean_stats["latest"]["drift_score"]) < 3, "a clean batch should score about 0"
    assert noise_stats["latest"]["drift_score"] > clean_stats["latest"]["drift_score"] + 3
    assert washed_stats["latest"]["drift_score"] > clean_stats["latest"]["drift_score"] + 3
    assert median_image_score(washed_answer) > 2 * median_image_score(clean_answer)
    first_layer = next(iter(noise_stats["latest"]["layers"]))
    assert metric(server, "robustnorm_layer_drift", layer=first_layer, measure="kl") == pytest.approx(
        washed_stats["latest"]["layers"][first_layer]["kl"])
    assert metric(server, "robustnorm_batch_drift_score_count") - scores_before == 3
    assert metric(server, "robustnorm_image_drift_score_count") - images_before == 96
    high = metric(server, "robustnorm_batch_drift_score_count") - metric(
        server, "robustnorm_batch_drift_score_bucket", le="3.0")
    assert high >= 2, "the shifted batches should land above 3 in robustnorm_batch_drift_score"


def test_every_error_is_answered_while_good_requests_are_served(server: LiveServer, cifar_samples: list[Sample],
                                                                offline_model: nn.Module) -> None:
    jpeg = cifar_samples[0].jpeg
    tiff = encoded_image((32, 32), "TIFF")
    too_many = [("image", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(MAX_IMAGES + 1)]
    at_limit = encoded_image((1000, 1000), "PNG")  # MAX_PIXELS each: four are over the request's pixel limit

    def raw(data: bytes, media_type: str, **params: Any) -> dict[str, Any]:
        return {"content": data, "headers": {"content-type": media_type}, "params": params}

    bad_requests: list[tuple[int, str, dict[str, Any]]] = [
        (400, "bad_image", raw(b"\xff\xd8\xff\xe0" + bytes(60), "image/jpeg")),
        (400, "bad_image", raw(jpeg[: len(jpeg) // 2], "image/jpeg")),
        (400, "bad_image", raw(b'{"images": ["not base64!"]}', "application/json")),
        (400, "bad_image", raw(b'{"images": [', "application/json")),
        (400, "bad_image", raw(b"[" * 100_000, "application/json")),
        (413, "too_large", raw(encoded_image((256, 256), "PNG", noise=True), "image/png")),
        (413, "too_large", raw(encoded_image((1200, 1000), "PNG"), "image/png")),
        (413, "too_large", {"files": [("image", (f"{i}.png", at_limit, "image/png")) for i in range(4)]}),
        (413, "too_many_images", {"files": too_many}),
        (415, "unsupported_type", raw(b"hello", "text/plain")),
        (415, "unsupported_type", raw(tiff, "image/tiff")),
        (415, "unsupported_type", raw(tiff, "application/octet-stream")),
        (422, "invalid", raw(jpeg, "image/jpeg", top_k=0)),
        (422, "invalid", raw(jpeg, "image/jpeg", top_k=11)),
        (422, "invalid", raw(jpeg, "image/jpeg", top_k="many")),
        (422, "invalid", raw(jpeg, "image/jpeg", timeout=-1)),
        (422, "invalid", raw(jpeg, "image/jpeg", policy="frozen")),
        (422, "invalid", {"json": {"images": []}}),
        (422, "invalid", {"json": {"pictures": ["x"]}}),
    ]
    good = cifar_samples[60:76]
    rejected_before = {reason: metric(server, "robustnorm_rejected_total", reason=reason)
                       for reason in ("bad_image", "too_large", "too_many_images", "unsupported_type", "invalid")}

    async def main() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with client_for(server) as client:
            bad = [client.post("/predict", **request) for _, _, request in bad_requests]
            fine = [send(client, [sample], body="raw") for sample in good]
            responses = await asyncio.gather(*bad, *fine)
        return responses[: len(bad)], responses[len(bad):]

    bad_responses, good_responses = run(main)
    for (status, code, _), response in zip(bad_requests, bad_responses):
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["message"]
    answers = [a for response, sample in zip(good_responses, good) for a in answers_of(response, [sample])]
    check_against_offline(offline_model, answers)
    expected = defaultdict(int)
    for _, code, _ in bad_requests:
        expected[code] += 1
    for reason, before in rejected_before.items():
        assert metric(server, "robustnorm_rejected_total", reason=reason) - before == expected[reason], reason
    assert metric(server, "robustnorm_requests_total", route="/predict", code="413") >= 4


def test_full_queue_answers_429_with_retry_after(server: LiveServer, cifar_samples: list[Sample],
                                                 offline_model: nn.Module) -> None:
    flood = [cifar_samples[i * 7 % 200:i * 7 % 200 + MAX_IMAGES] for i in range(12)]

    async def main() -> tuple[list[httpx.Response], list[list[Sample]]]:
        """Floods of 12 concurrent full requests, until one is refused (the first almost always is)."""
        responses, requests = [], []
        async with client_for(server) as client:
            for _ in range(3):
                responses += await asyncio.gather(*(send(client, samples) for samples in flood))
                requests += flood
                if any(response.status_code == 429 for response in responses):
                    break
        return responses, requests

    before = metric(server, "robustnorm_rejected_total", reason="queue_full")
    responses, requests = run(main)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert 429 in statuses, f"the queue never filled: {statuses}"
    assert 200 in statuses
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["code"] == "queue_full"
    assert metric(server, "robustnorm_rejected_total", reason="queue_full") - before == statuses.count(429)
    answers = [a for r, s in zip(responses, requests) if r.status_code == 200 for a in answers_of(r, s)]
    check_against_offline(offline_model, answers)
    assert stats(server)["queued_images"] == 0


def test_passed_deadline_gets_504_and_never_runs(server: LiveServer, cifar_samples: list[Sample]) -> None:
    images_before = stats(server)["images"]
    deadline_before = metric(server, "robustnorm_rejected_total", reason="deadline")
    response = httpx.post(f"{server.url}/predict", content=cifar_samples[3].jpeg,
                          headers={"content-type": "image/jpeg"}, params={"timeout": 0.001})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline"
    assert stats(server)["images"] == images_before, "an image past its deadline was run"
    assert metric(server, "robustnorm_rejected_total", reason="deadline") == deadline_before + 1
    after = httpx.post(f"{server.url}/predict", content=cifar_samples[3].jpeg, headers={"content-type": "image/jpeg"})
    assert after.status_code == 200


def test_tenants_are_normalised_apart_inside_shared_forwards(tenant_server: LiveServer, cifar_samples: list[Sample],
                                                             offline_model: nn.Module) -> None:
    async def main() -> list[Answer]:
        async with client_for(tenant_server) as client:
            jobs, meta = [], []
            for i in range(16):
                tenant = "a" if i % 2 == 0 else "b"
                samples = cifar_samples[120 + 2 * i:122 + 2 * i]
                jobs.append(send(client, samples, headers={"X-API-Key": f"key-{tenant}"}))
                meta.append((samples, tenant))
            responses = await asyncio.gather(*jobs)
        return [a for r, (s, t) in zip(responses, meta) for a in answers_of(r, s, t)]

    answers = run(main)
    tenants_of_group: dict[tuple[str, int], set[str | None]] = defaultdict(set)
    groups_of_forward: dict[str, set[int]] = defaultdict(set)
    for answer in answers:
        batch = answer.prediction["batch"]
        tenants_of_group[(batch["id"], batch["group"])].add(answer.tenant)
        groups_of_forward[batch["id"]].add(batch["group"])
    assert all(len(tenants) == 1 for tenants in tenants_of_group.values()), "tenants shared statistics"
    assert any(len(groups) == 2 for groups in groups_of_forward.values()), "tenants never shared a forward pass"
    check_against_offline(offline_model, answers)

    unauthorized = httpx.post(f"{tenant_server.url}/predict", content=cifar_samples[0].jpeg,
                              headers={"content-type": "image/jpeg"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "unauthorized"
    wrong = httpx.post(f"{tenant_server.url}/predict", content=cifar_samples[0].jpeg,
                       headers={"content-type": "image/jpeg", "Authorization": "Bearer key-c"})
    assert wrong.status_code == 401
    assert metric(tenant_server, "robustnorm_rejected_total", ADMIN, reason="unauthorized") == 2


def test_requests_with_different_policies_never_share_a_batch(tenant_server: LiveServer, cifar_samples: list[Sample],
                                                              offline_model: nn.Module) -> None:
    async def main() -> list[tuple[str, Answer]]:
        async with client_for(tenant_server) as client:
            jobs, meta = [], []
            for i in range(12):
                policy = "frozen" if i % 3 == 0 else ("batch" if i % 3 == 1 else None)
                samples = cifar_samples[150 + 3 * i:153 + 3 * i]
                params = {"policy": policy} if policy else None
                jobs.append(send(client, samples, params=params, headers={"X-API-Key": "key-a"}))
                meta.append((samples, policy or TEST_POLICY))
            responses = await asyncio.gather(*jobs)
        return [(p, a) for r, (s, p) in zip(responses, meta) for a in answers_of(r, s, "a")]

    pairs = run(main)
    policies_of_batch: dict[str, set[str]] = defaultdict(set)
    for policy, answer in pairs:
        batch = answer.prediction["batch"]
        assert batch["policy"] == policy
        policies_of_batch[batch["id"]].add(policy)
        if policy == "frozen":
            assert batch["statistics"] == "frozen" and not batch["fallback"]
        if policy == "batch":
            assert batch["statistics"] == "batch"
        # Drift scores are calibrated under the card's policy: other policies get none rather than a wrong one.
        calibrated = policy == TEST_POLICY
        assert batch["drift_score"] is None, "batch drift is scored after the answers (drift_metrics 'after')"
        assert isinstance(answer.prediction["drift_score"], float) == calibrated, (policy, answer.prediction)
    assert all(len(policies) == 1 for policies in policies_of_batch.values())
    check_against_offline(offline_model, [answer for _, answer in pairs])

    invalid = httpx.post(f"{tenant_server.url}/predict", content=cifar_samples[0].jpeg, params={"policy": "often"},
                         headers={"content-type": "image/jpeg", "X-API-Key": "key-a"})
    assert invalid.status_code == 422 and "valid forms" in invalid.json()["error"]["message"]


def test_json_error_body_shape_for_unknown_routes(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/nowhere")
    assert response.status_code == 404
    assert set(json.loads(response.text)["error"]) == {"code", "message"}
    assert metric(server, "robustnorm_requests_total", route="unmatched", code="404") >= 1
