"""The real service under overload and unfair tenants: deadlines from a trusted proxy, refusals at the door, one
tenant's flood against another's steady traffic, and no 200 after its deadline.

Each server is the bundled model served by uvicorn on 127.0.0.1 (in a thread); requests carry the photographs
of examples/. Loops are bounded in count; the assertions are about answers, never about timings.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from service_support import LiveServer, examples, serve

from service.app import create_app
from service.settings import Settings

MODEL = "cifar10-resnet20-robustnorm"
DEADLINE = 2.0  # seconds, of the overloaded server
JPEG = {"content-type": "image/jpeg"}
TENANT = "X-Tenant"


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [data for name, data in examples().items() if name.endswith(".jpg")]


def start_header(seconds_ago: float, unit: str = "us") -> dict[str, str]:
    at = time.time() - seconds_ago
    return {"X-Request-Start": f"t={int(at * 1e6)}" if unit == "us" else f"t={at:.3f}", **JPEG}


def counter(server: LiveServer, name: str, **labels: str) -> float:
    registry = server.app.state.metrics.registry
    return registry.get_sample_value(name, labels) or 0.0


def stats(server: LiveServer) -> dict:
    return httpx.get(f"{server.url}/v1/stats").json()


# -- deadlines from a trusted proxy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def behind_proxy() -> Iterator[LiveServer]:
    settings = Settings(model=MODEL, device="cpu", request_deadline=5.0, trust_request_start=True)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


@pytest.fixture(scope="module")
def open_to_clients() -> Iterator[LiveServer]:
    settings = Settings(model=MODEL, device="cpu", request_deadline=5.0)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


@pytest.mark.parametrize("unit", ["us", "s"])
def test_time_queued_in_a_trusted_proxy_counts_against_the_deadline(behind_proxy: LiveServer, photos: list[bytes],
                                                                    unit: str) -> None:
    images_before = stats(behind_proxy)["images"]
    refused_before = counter(behind_proxy, "robustnorm_rejected_total", reason="deadline")
    with httpx.Client(base_url=behind_proxy.url) as client:
        late = client.post("/predict", content=photos[0], headers=start_header(6.0, unit))
        assert late.status_code == 504, late.text
        assert late.json()["error"]["code"] == "deadline"
        assert late.headers.get("connection") != "close"  # refused with its body read: the connection goes on
        fresh = client.post("/predict", content=photos[0], headers=start_header(0.5, unit))
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["timings"]["total_seconds"] >= 0.5  # counted from the proxy's time
    assert stats(behind_proxy)["images"] == images_before + 1, "the late image ran"
    assert counter(behind_proxy, "robustnorm_rejected_total", reason="deadline") == refused_before + 1


def test_a_request_start_from_an_untrusted_client_is_ignored(open_to_clients: LiveServer,
                                                             photos: list[bytes]) -> None:
    for headers in (start_header(6.0), start_header(-60.0), {"X-Request-Start": "t=soon", **JPEG}):
        response = httpx.post(f"{open_to_clients.url}/predict", content=photos[1], headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["timings"]["total_seconds"] < 5.0


def test_an_unreadable_or_future_request_start_counts_from_the_first_byte(behind_proxy: LiveServer,
                                                                         photos: list[bytes]) -> None:
    for value in ("t=soon", f"t={int((time.time() + 60) * 1e6)}", "", "t=-1"):
        response = httpx.post(f"{behind_proxy.url}/predict", content=photos[2],
                              headers={"X-Request-Start": value, **JPEG})
        assert response.status_code == 200, (value, response.text)


# -- overload: every request answered, never late -----------------------------------------------------------


@pytest.fixture(scope="module")
def tight() -> Iterator[LiveServer]:
    """A short deadline and queue: a burst of requests overloads it. Every body of the burst may arrive at once
    (the bound on uploads arriving together is tested in test_hostile)."""
    settings = Settings(model=MODEL, device="cpu", request_deadline=DEADLINE, queue_limit=64, max_batch_size=8,
                        max_images_per_request=8, max_uploads=512)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


def test_a_burst_beyond_capacity_is_answered_200_429_or_504_and_no_200_is_late(tight: LiveServer,
                                                                              photos: list[bytes]) -> None:
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=tight.url, limits=limits, timeout=30) as client:
            files = [[("image", (f"{i}.jpg", photos[(i + j) % len(photos)], "image/jpeg")) for j in range(8)]
                     for i in range(100)]
            return await asyncio.gather(*(client.post("/predict", files=parts) for parts in files))

    responses = asyncio.run(burst())
    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) <= {200, 429, 504}, statuses
    assert statuses[200] >= 1 and statuses[429] + statuses[504] >= 1, statuses
    for response in responses:
        if response.status_code == 200:
            assert response.json()["timings"]["total_seconds"] <= DEADLINE  # never answered after its deadline
        elif response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["code"] in ("overloaded", "queue_full")
        else:
            assert response.json()["error"]["code"] == "deadline"
    assert stats(tight)["queued_images"] == 0
    refused = sum(counter(tight, "robustnorm_rejected_total", reason=reason)
                  for reason in ("overloaded", "queue_full", "deadline"))
    assert refused == statuses[429] + statuses[504]
    assert counter(tight, "robustnorm_requests_total", route="/predict", code="429") == statuses[429]


# -- fairness -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared() -> Iterator[LiveServer]:
    """Tenants named by a header share a queue of 16 images; one may hold half of it while another is active.
    The deadline is long, so that only the shares refuse work."""
    settings = Settings(model=MODEL, device="cpu", batch_key="header", queue_limit=16, max_batch_size=4,
                        max_images_per_request=4, tenant_queue_share=0.5, request_deadline=120, max_uploads=512)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


def test_a_tenant_flooding_the_queue_gets_429_while_another_tenant_is_served(shared: LiveServer,
                                                                            photos: list[bytes]) -> None:
    refused_before = counter(shared, "robustnorm_rejected_total", reason="tenant_share")

    async def traffic() -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=shared.url, limits=limits, timeout=60) as client:
            def send(tenant: str, index: int) -> asyncio.Future[httpx.Response]:
                headers = {TENANT: tenant, **JPEG}
                return asyncio.ensure_future(client.post("/predict", content=photos[index % len(photos)],
                                                         headers=headers))

            def send_four(tenant: str, index: int) -> asyncio.Future[httpx.Response]:
                files = [("image", (f"{index}-{i}.jpg", photos[(index + i) % len(photos)], "image/jpeg"))
                         for i in range(4)]
                return asyncio.ensure_future(client.post("/predict", files=files, headers={TENANT: tenant}))

            light: list[httpx.Response] = [await send("light", 0)]  # the light tenant is active from here on
            flood_done = asyncio.Event()

            async def steady() -> None:
                index = 1
                while not flood_done.is_set() and index < 60:
                    light.append(await send("light", index))
                    index += 1

            steady_task = asyncio.ensure_future(steady())
            heavy: list[httpx.Response] = []
            # Waves of 80 requests of 4 images, 40x the heavy tenant's share of 8: the queue fills however fast
            # the engine answers (with one image a request, a fast engine kept up with this client and nothing
            # was ever refused)
            for wave in range(3):
                heavy += await asyncio.gather(*(send_four("heavy", wave * 80 + i) for i in range(80)))
            flood_done.set()
            await steady_task
            return heavy, light

    heavy, light = asyncio.run(traffic())
    heavy_statuses = Counter(response.status_code for response in heavy)
    assert set(heavy_statuses) <= {200, 429}, heavy_statuses
    assert heavy_statuses[200] >= 1 and heavy_statuses[429] >= 1, heavy_statuses
    for response in heavy:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "tenant_share"
            assert int(response.headers["Retry-After"]) >= 1
    assert [response.status_code for response in light] == [200] * len(light), \
        Counter(response.status_code for response in light)
    assert len(light) >= 2
    for response in heavy + light:
        if response.status_code == 200:
            prediction = response.json()["predictions"][0]
            assert prediction["label"] and 0 <= prediction["score"] <= 1
    assert counter(shared, "robustnorm_rejected_total", reason="tenant_share") - refused_before == \
        heavy_statuses[429]
    assert stats(shared)["queued_images"] == 0


@pytest.fixture(scope="module")
def quota() -> Iterator[LiveServer]:
    """Tenants named by a header, each admitted 5 requests a second at most (bursts of one)."""
    settings = Settings(model=MODEL, device="cpu", batch_key="header", tenant_rate=5.0, request_deadline=60,
                        max_uploads=512)
    yield from serve(create_app(settings, registry=CollectorRegistry()))


def test_a_tenant_over_its_rate_quota_gets_429_tenant_rate_and_the_others_are_served(quota: LiveServer,
                                                                                    photos: list[bytes]) -> None:
    refused_before = counter(quota, "robustnorm_rejected_total", reason="tenant_rate")

    async def traffic() -> tuple[list[httpx.Response], list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=quota.url, limits=httpx.Limits(max_connections=64),
                                     timeout=60) as client:
            def send(tenant: str, index: int) -> asyncio.Future[httpx.Response]:
                return asyncio.ensure_future(client.post("/predict", content=photos[index % len(photos)],
                                                         headers={TENANT: tenant, **JPEG}))

            started = time.monotonic()
            heavy = list(await asyncio.gather(*(send("heavy", i) for i in range(40))))  # 40 at once
            light = [await send("light", 0)]  # another tenant's bucket is its own
            await asyncio.sleep(0.25)
            light.append(await send("light", 1))
            return heavy, light, time.monotonic() - started

    heavy, light, seconds = asyncio.run(traffic())
    statuses = Counter(response.status_code for response in heavy)
    assert set(statuses) == {200, 429}, statuses
    # one token to start with, then 5 a second while the 40 requests were being answered
    assert statuses[200] <= 1 + 5 * seconds + 1, (statuses, seconds)
    for response in heavy:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "tenant_rate"
            assert int(response.headers["Retry-After"]) >= 1
    assert [response.status_code for response in light] == [200, 200]
    assert counter(quota, "robustnorm_rejected_total", reason="tenant_rate") - refused_before == statuses[429]
