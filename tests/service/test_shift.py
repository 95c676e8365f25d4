"""Adaptation through the real server: corrupted single images make a stream's statistics adapt.

The bundled BatchNorm model (its card's drift gate) behind uvicorn on loopback; every image is its own request,
so every batch holds one image. Contrast at CIFAR-10-C's severity 5 takes the model's frozen accuracy far down;
once the gate has seen enough of it, the stream's statistics run and win much of it back. Tenants keep streams
of their own, and only an admin key may reset them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from service_support import LiveServer, serve

import robustnorm
from robustnorm.corruptions import corrupt
from robustnorm.data import load_cifar10, normalize, to_float
from service.app import create_app
from service.settings import Settings

ADMIN, TENANT = "admin-key-for-tests", "tenant-key-for-tests"
MODEL = "cifar10-resnet20-bn"
IMAGES = 240


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(device="cpu", model=MODEL, policy="auto:64:64", batch_key="header",
                        admin_keys={ADMIN: "ops"}, api_keys={TENANT: "tenant"}, max_batch_size=8)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


@pytest.fixture(scope="module")
def contrast(cifar10: Path) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_cifar10("test", cifar10)
    order = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(7))[:IMAGES]
    shifted = corrupt("contrast", to_float(test.images[order]), 5, 0)
    return (shifted * 255).round().to(torch.uint8), test.labels[order]


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def predict(server: LiveServer, image: torch.Tensor, tenant: str) -> dict:
    response = httpx.post(f"{server.url}/predict", content=png(image), timeout=30,
                          headers={"Content-Type": "image/png", "X-API-Key": TENANT, "X-Tenant": tenant})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


@pytest.mark.slow
def test_single_corrupted_images_adapt_the_stream(server: LiveServer, contrast: tuple[torch.Tensor, torch.Tensor]
                                                  ) -> None:
    images, labels = contrast
    answers = [predict(server, image, "camera-a") for image in images]
    ran = [answer["batch"]["statistics"] for answer in answers]
    held = [answer["batch"]["stream_images"] for answer in answers]
    assert ran[0] == "frozen" and held[0] == 0, "a new stream starts from the population statistics"
    assert held[:64] == list(range(64)), "each single image joins the stream"
    switched = ran.index("stream")
    assert 64 <= switched <= 96, "the gate decides once it holds 64 images, and contrast is far out"
    assert set(ran[switched:]) == {"stream"}, "the gate holds while the traffic stays shifted"
    assert max(held) == 64, "the window holds 64 images"
    model, card = robustnorm.load_model(MODEL)
    with torch.no_grad(), robustnorm.batch_groups(model, policy="frozen"):
        frozen = model(normalize(to_float(images), card.mean, card.std)).argmax(dim=1)
    served = torch.tensor([answer["index"] for answer in answers])
    late = slice(128, None)
    frozen_accuracy = float((frozen[late] == labels[late]).float().mean())
    served_accuracy = float((served[late] == labels[late]).float().mean())
    assert served_accuracy > frozen_accuracy + 0.25, (served_accuracy, frozen_accuracy)
    # Another tenant's clean traffic starts its own stream, from the population statistics.
    other = predict(server, torch.full((3, 32, 32), 128, dtype=torch.uint8), "camera-b")
    assert other["batch"]["stream_images"] == 0 and other["batch"]["statistics"] == "frozen"
    stats = httpx.get(f"{server.url}/v1/stats", headers={"X-API-Key": TENANT}).json()
    assert stats["streams"] == 2
    metrics = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": ADMIN}).text
    assert 'robustnorm_gate_switches_total{to="stream"} 1.0' in metrics
    assert 'robustnorm_batches_total{fallback="false",statistics="stream"}' in metrics


def test_only_an_admin_key_resets_streams(server: LiveServer) -> None:
    url = f"{server.url}/v1/streams/reset"
    assert httpx.post(url, json={}).status_code == 401
    refused = httpx.post(url, json={}, headers={"X-API-Key": TENANT})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    image = torch.from_numpy(np.full((3, 32, 32), 90, dtype=np.uint8))
    predict(server, image, "camera-c")
    assert predict(server, image, "camera-c")["batch"]["stream_images"] == 1
    answer = httpx.post(url, json={"streams": ["camera-c"]}, headers={"X-API-Key": ADMIN})
    assert answer.status_code == 200 and answer.json() == {"dropped": 1}
    assert predict(server, image, "camera-c")["batch"]["stream_images"] == 0


def test_admin_routes_are_off_without_an_admin_key() -> None:
    for plain in serve(create_app(Settings(device="cpu", model=MODEL), registry=CollectorRegistry())):
        answer = httpx.post(f"{plain.url}/v1/streams/reset", json={}, headers={"X-API-Key": ADMIN})
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def held_after(url: str, image: torch.Tensor, *, source: str = "127.0.0.1", forwarded: str | None = None) -> int:
    """How many images the stream held when ``image`` ran, sent from the loopback address ``source``."""
    headers = {"Content-Type": "image/png"} | ({"X-Forwarded-For": forwarded} if forwarded else {})
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as client:
        response = client.post(f"{url}/predict", content=png(image), headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["batch"]["stream_images"]


def test_each_client_has_a_stream_of_its_own_by_default() -> None:
    images = (torch.full((3, 32, 32), value, dtype=torch.uint8) for value in range(60, 200))  # a stream counts
    for live in serve(create_app(Settings(device="cpu", model=MODEL, policy="stream:64"),  # distinct images
                                 registry=CollectorRegistry())):
        assert [held_after(live.url, next(images)) for _ in range(3)] == [0, 1, 2]
        assert held_after(live.url, next(images), source="127.0.0.2") == 0, "another address, another stream"
        assert held_after(live.url, next(images), forwarded="10.0.0.9") == 3, \
            "X-Forwarded-For is not trusted by default"
        assert httpx.get(f"{live.url}/v1/stats").json()["streams"] == 2
    shared = Settings(device="cpu", model=MODEL, policy="stream:64", stream_key="shared")
    for live in serve(create_app(shared, registry=CollectorRegistry())):
        assert [held_after(live.url, next(images), source=source) for source in ("127.0.0.1", "127.0.0.2")] == [0, 1]
    proxied = Settings(device="cpu", model=MODEL, policy="stream:64", trust_forwarded_for=True)
    for live in serve(create_app(proxied, registry=CollectorRegistry())):
        assert held_after(live.url, next(images), forwarded="10.0.0.9") == 0
        assert held_after(live.url, next(images), forwarded="spoofed, 10.0.0.9") == 1, "the proxy's entry is the last"
        assert held_after(live.url, next(images), forwarded="10.0.0.10") == 0
        assert held_after(live.url, next(images)) == 0, "no header: the peer's address"


def test_one_image_sent_again_and_again_is_not_taken_for_shifted_traffic() -> None:
    """A client repeating one picture (a probe, a load test, retries) gives its stream one image, not a window of
    copies whose statistics the gate would read as shift: the answers stay those of the population statistics."""
    body = (Path(__file__).resolve().parents[2] / "examples" / "cat.jpg").read_bytes()
    for live in serve(create_app(Settings(device="cpu"), registry=CollectorRegistry())):  # the default model
        with httpx.Client(timeout=30) as client:
            answers = [client.post(f"{live.url}/predict", content=body, headers={"Content-Type": "image/jpeg"})
                       for _ in range(100)]  # beyond the gate's 64 images
            metrics = client.get(f"{live.url}/metrics").text
        predictions = [answer.json()["predictions"][0] for answer in answers]
        assert {(p["label"], p["batch"]["statistics"], p["batch"]["stream_images"]) for p in predictions[1:]} == {
            ("cat", "frozen", 1)}
        assert 'robustnorm_gate_switches_total{to="stream"} 0.0' in metrics
        assert "robustnorm_stream_repeated_images_total 99.0" in metrics, "the copies are counted"
