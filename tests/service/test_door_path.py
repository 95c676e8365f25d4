"""The door answers ``POST /predict`` itself, without FastAPI's routing (service.routes.serve_predict): its answers
must be the FastAPI route's, request for request. Two live servers of the same model take the same requests in
the same order, one answering through the door, the other through the route; bodies, statuses, error codes and
headers must match (all but what differs by nature: request ids made up by the server, batch ids, timings)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from service_support import LiveServer, Sample, examples
from starlette.types import ASGIApp

from service.app import create_app
from service.door import DoorMiddleware
from service.schemas import PredictResponse
from service.settings import Settings


class RouteDoor(DoorMiddleware):
    """The door, but what it admits goes on to the FastAPI route (the reference path)."""

    routed = 0

    def __init__(self, app: ASGIApp, **options: Any) -> None:
        async def through_the_route(scope: Any, receive: Any, send: Any, **_: Any) -> None:
            RouteDoor.routed += 1
            await app(scope, receive, send)

        super().__init__(app, **{**options, "serve": through_the_route})


def _server(model_dir: Path, *, through_route: bool) -> LiveServer:
    settings = Settings(model=str(model_dir), device="cpu", engine="torch", max_batch_size=8, max_wait=0.0,
                        allow_policy_override=True)
    app = create_app(settings, registry=CollectorRegistry())
    if through_route:
        for middleware in app.user_middleware:
            if middleware.cls is DoorMiddleware:
                middleware.cls = RouteDoor  # type: ignore[assignment]
    server = LiveServer(app)
    server.start()
    return server


@pytest.fixture(scope="module")
def servers(model_dir: Path) -> Iterator[tuple[LiveServer, LiveServer]]:
    door, route = _server(model_dir, through_route=False), _server(model_dir, through_route=True)
    try:
        yield door, route
    finally:
        door.stop()
        route.stop()


def _requests(samples: list[Sample]) -> list[dict[str, Any]]:
    """Requests of every form and the errors of the query and the body, as httpx keyword arguments."""
    jpegs = [sample.jpeg for sample in samples]
    photos = list(examples().values())
    raw = {"headers": {"content-type": "image/jpeg"}}
    return [
        {"content": jpegs[0], **raw},
        {"content": jpegs[1], **raw, "params": {"top_k": "3"}},
        {"content": jpegs[2], "headers": {"content-type": "image/jpeg", "X-Request-ID": "client-id-7"}},
        {"files": [("image", ("a.jpg", jpeg, "image/jpeg")) for jpeg in jpegs[3:7]]},
        {"files": [("image", ("photo", photo, "application/octet-stream")) for photo in photos]},
        {"json": {"images": [base64.b64encode(jpeg).decode() for jpeg in jpegs[7:10]]}},
        {"content": jpegs[10], **raw, "params": {"policy": "frozen", "timeout": "5"}},
        {"content": jpegs[11], **raw, "params": {"top_k": "0"}},
        {"content": jpegs[11], **raw, "params": {"top_k": "many"}},
        {"content": jpegs[11], **raw, "params": {"timeout": "-1"}},
        {"content": jpegs[11], **raw, "params": {"top_k": "11"}},
        {"content": jpegs[11], **raw, "params": {"policy": "no-such-policy"}},
        {"content": b"not an image", **raw},
        {"content": b"<xml/>", "headers": {"content-type": "text/xml"}},
        {"json": {"images": []}},
        {"content": jpegs[12], **raw, "params": {"top_k": "2", "unknown": "ignored"}},
    ]


def _comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A prediction body without what differs between two servers by nature."""
    body = json.loads(json.dumps(body))
    if "timings" in body:
        body["timings"] = sorted(body["timings"])
    if len(body.get("request_id", "")) == 32:
        body["request_id"] = "made up by the server"
    for prediction in body.get("predictions", []):
        prediction["batch"]["id"] = "-"
        prediction["batch"]["inference_seconds"] = 0.0
    return body


def _predict_counts(client: httpx.Client) -> dict[str, float]:
    counts = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "robustnorm_requests_total" and sample.labels["route"] == "/predict":
                counts[sample.labels["code"]] = sample.value
    return counts


def test_the_door_answers_every_request_as_the_route_does(servers: tuple[LiveServer, LiveServer],
                                                          cifar_samples: list[Sample]) -> None:
    door, route = servers
    with httpx.Client(base_url=door.url, timeout=30) as fast, httpx.Client(base_url=route.url, timeout=30) as slow:
        requests = _requests(cifar_samples)
        for request in requests:
            ours, reference = fast.post("/predict", **request), slow.post("/predict", **request)
            assert ours.status_code == reference.status_code, (request.get("params"), ours.text, reference.text)
            assert _comparable(ours.json()) == _comparable(reference.json())
            assert ours.headers["content-type"] == reference.headers["content-type"]
            assert ("x-request-id" in ours.headers) == ("x-request-id" in reference.headers)
            if ours.status_code == 200:
                assert ours.headers["x-request-id"] == ours.json()["request_id"]
                PredictResponse.model_validate_json(ours.content)  # the shape the API documents
        counts = _predict_counts(fast)
        assert counts == _predict_counts(slow)
    assert counts == {"200": 8, "422": 6, "400": 1, "415": 1}
    assert RouteDoor.routed == len(requests)  # the reference server's door did send them all to the route
