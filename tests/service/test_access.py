"""Who may call what, on the real service: keys carry a role (tenant, admin, metrics), a tenant sees only its
own batches, batch ids say nothing of other tenants' traffic, and which header carries the key is defined."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from service_support import LiveServer, examples, serve

from service.app import create_app
from service.settings import Settings

MODEL = "cifar10-resnet20-robustnorm"
TENANT_A, TENANT_B, ADMIN, SCRAPER = "key-of-tenant-a", "key-of-tenant-b", "key-of-the-admin", "key-of-prometheus"
KEYS = {"api_keys": {TENANT_A: "a", TENANT_B: "b"}, "admin_keys": {ADMIN: "ops"}, "metrics_keys": {SCRAPER: "prom"}}
OPEN_ROUTES = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json")


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


@pytest.fixture(scope="module")
def keyed() -> Iterator[LiveServer]:
    """Tenants batched apart by their keys."""
    settings = Settings(model=MODEL, device="cpu", batch_key="api_key", **KEYS)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


@pytest.fixture(scope="module")
def photo() -> bytes:
    return examples()["cat.jpg"]


def predict(server: LiveServer, photo: bytes, headers: dict[str, str] | list[tuple[str, str]] | None = None
            ) -> httpx.Response:
    if isinstance(headers, dict) or headers is None:
        headers = [*(headers or {}).items()]
    return httpx.post(f"{server.url}/predict", content=photo, headers=[("Content-Type", "image/jpeg"), *headers],
                      timeout=30)


def call(server: LiveServer, route: str, headers: dict[str, str] | None = None) -> httpx.Response:
    if route == "/predict":
        return predict(server, examples()["cat.jpg"], headers)
    if route == "/v1/streams/reset":
        return httpx.post(f"{server.url}{route}", json={}, headers=headers)
    return httpx.get(f"{server.url}{route}", headers=headers)


KEYED_ROUTES = ("/predict", "/v1/model", "/v1/stats", "/metrics", "/v1/streams/reset")
# route -> status for: no key, a tenant's key, the admin's key, the scraper's key, an unknown key
EXPECTED = {
    "/predict": (401, 200, 200, 403, 401),
    "/v1/model": (401, 200, 200, 403, 401),
    "/v1/stats": (401, 200, 200, 403, 401),
    "/metrics": (401, 403, 200, 200, 401),
    "/v1/streams/reset": (401, 403, 200, 403, 401),
}


def test_every_route_but_the_probes_and_docs_needs_a_key_of_its_role(keyed: LiveServer) -> None:
    for route in OPEN_ROUTES:
        assert call(keyed, route).status_code == 200, route
        assert call(keyed, route, key("no-such-key")).status_code == 200, route  # keys are not looked at there
    callers = (None, key(TENANT_A), key(ADMIN), key(SCRAPER), key("no-such-key"))
    for route in KEYED_ROUTES:
        statuses = tuple(call(keyed, route, headers).status_code for headers in callers)
        assert statuses == EXPECTED[route], (route, statuses)
    refused = call(keyed, "/metrics", key(TENANT_A))
    assert refused.json()["error"]["code"] == "forbidden"
    assert call(keyed, "/v1/model").headers["WWW-Authenticate"] == "Bearer"


def test_which_header_carries_the_key(keyed: LiveServer, photo: bytes) -> None:
    """X-API-Key or Authorization: Bearer; when both (or several) are sent they must be the same key."""
    bearer = {"Authorization": f"Bearer {TENANT_A}"}
    assert predict(keyed, photo, key(TENANT_A)).status_code == 200
    assert predict(keyed, photo, bearer).status_code == 200
    assert predict(keyed, photo, {"Authorization": f"bearer {TENANT_A}"}).status_code == 200
    assert predict(keyed, photo, {**key(TENANT_A), **bearer}).status_code == 200
    for conflicting in ({**key(TENANT_A), "Authorization": "Bearer wrong"},
                        {**key("wrong"), **bearer},
                        {**key(TENANT_B), **bearer}):
        answer = predict(keyed, photo, conflicting)
        assert answer.status_code == 401 and "different keys" in answer.json()["error"]["message"], conflicting
    two = predict(keyed, photo, [("X-API-Key", TENANT_A), ("X-API-Key", TENANT_B)])
    assert two.status_code == 401
    # Another scheme in Authorization carries no key of ours: X-API-Key alone decides.
    assert predict(keyed, photo, {**key(TENANT_A), "Authorization": "Basic dXNlcjpwYXNz"}).status_code == 200
    assert predict(keyed, photo, {"Authorization": "Basic dXNlcjpwYXNz"}).status_code == 401


def stats(server: LiveServer, value: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/v1/stats", headers=key(value))
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_tenant_sees_only_its_own_batches_and_an_admin_all(keyed: LiveServer, photo: bytes) -> None:
    before_a, before_b, before_all = stats(keyed, TENANT_A), stats(keyed, TENANT_B), stats(keyed, ADMIN)
    a_batches = [predict(keyed, photo, key(TENANT_A)).json()["predictions"][0]["batch"] for _ in range(3)]
    b_batch = predict(keyed, photo, key(TENANT_B)).json()["predictions"][0]["batch"]
    seen_by_a, seen_by_b, seen_by_admin = stats(keyed, TENANT_A), stats(keyed, TENANT_B), stats(keyed, ADMIN)
    assert seen_by_a["latest"]["id"] == a_batches[-1]["id"]  # not b's, which ran later
    assert seen_by_b["latest"]["id"] == b_batch["id"]
    assert seen_by_admin["latest"]["id"] == b_batch["id"]
    assert seen_by_a["latest"]["layers"] and seen_by_b["latest"]["layers"]
    assert (seen_by_a["images"] - before_a["images"], seen_by_a["batches"] - before_a["batches"]) == (3, 3)
    assert (seen_by_b["images"] - before_b["images"], seen_by_b["batches"] - before_b["batches"]) == (1, 1)
    assert seen_by_admin["images"] - before_all["images"] == 4


def test_batch_ids_name_the_process_and_say_nothing_of_the_traffic(keyed: LiveServer, photo: bytes) -> None:
    ids = [predict(keyed, photo, key(TENANT_A)).json()["predictions"][0]["batch"]["id"] for _ in range(6)]
    assert all(re.fullmatch(r"[0-9a-f]{6}-[0-9a-f]{12}", batch_id) for batch_id in ids), ids
    assert len({batch_id.split("-")[0] for batch_id in ids}) == 1  # the process
    numbers = [int(batch_id.split("-")[1], 16) for batch_id in ids]
    assert len(set(numbers)) == len(ids)
    assert not any(later - earlier == 1 for earlier, later in itertools.pairwise(numbers)), "batch ids count up"


@pytest.fixture(scope="module")
def header_tenants() -> Iterator[LiveServer]:
    """Tenants named by a header (a gateway's), callers still need a key."""
    settings = Settings(model=MODEL, device="cpu", batch_key="header", **KEYS)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


def test_a_tenant_named_by_a_header_sees_aggregates_only(header_tenants: LiveServer, photo: bytes) -> None:
    before = stats(header_tenants, TENANT_A)
    answer = predict(header_tenants, photo, {**key(TENANT_A), "X-Tenant": "camera-1"})
    assert answer.status_code == 200
    seen = stats(header_tenants, TENANT_A)
    assert seen["latest"] is None and seen["images"] == before["images"] + 1
    assert stats(header_tenants, ADMIN)["latest"]["id"] == answer.json()["predictions"][0]["batch"]["id"]


@pytest.fixture(scope="module")
def open_service() -> Iterator[LiveServer]:
    """No tenant keys: predictions are public; an admin key still guards the admin route."""
    settings = Settings(model=MODEL, device="cpu", admin_keys={ADMIN: "ops"})
    yield from serve(create_app(settings, registry=CollectorRegistry()))


def test_without_tenant_keys_the_service_is_open_but_a_sent_key_must_be_valid(open_service: LiveServer,
                                                                             photo: bytes) -> None:
    answer = predict(open_service, photo)
    assert answer.status_code == 200
    assert httpx.get(f"{open_service.url}/metrics").status_code == 200
    everything = httpx.get(f"{open_service.url}/v1/stats").json()
    assert everything["latest"]["id"] == answer.json()["predictions"][0]["batch"]["id"]
    assert predict(open_service, photo, key("no-such-key")).status_code == 401
    assert httpx.post(f"{open_service.url}/v1/streams/reset", json={}).status_code == 401
    assert httpx.post(f"{open_service.url}/v1/streams/reset", json={}, headers=key(ADMIN)).status_code == 200


def test_keys_have_one_role_each() -> None:
    with pytest.raises(ValueError, match="one role"):
        Settings(api_keys={"shared": "a"}, metrics_keys={"shared": "prom"})
