"""The app's lifecycle on a live server: not ready while warming up, ready, then draining (all 503s typed)."""

from __future__ import annotations

import io
import threading
import time

import httpx
import torch
from PIL import Image
from prometheus_client import CollectorRegistry
from service_support import LiveServer

import robustnorm
from service.app import create_app
from service.engines import TorchEngine
from service.settings import Settings


class SlowWarmUpEngine(TorchEngine):
    """A real engine whose warm-up waits until the test lets it finish."""

    release = threading.Event()

    def warm_up(self) -> None:
        assert self.release.wait(timeout=30)
        super().warm_up()


def build_engine(settings: Settings) -> TorchEngine:
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm="robustnorm", p=0.2).eval()
    card = robustnorm.ModelCard(name="tiny", architecture="resnet20", norm="robustnorm", p=0.2,
                                labels=[str(i) for i in range(10)], policy="adaptive:4")
    return SlowWarmUpEngine(model, card, device=torch.device("cpu"),
                            policy=robustnorm.parse_policy(settings.policy or card.policy),
                            max_batch_size=settings.max_batch_size, padding=False)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_not_ready_until_warmed_up_then_ready_then_draining() -> None:
    settings = Settings(device="cpu", max_batch_size=8, max_wait=0.001)
    app = create_app(settings, registry=CollectorRegistry(), engine_factory=build_engine)
    SlowWarmUpEngine.release.clear()
    server = LiveServer(app)
    server.start(until_ready=False)
    try:
        client = httpx.Client(base_url=server.url)
        assert client.get("/healthz").status_code == 200
        warming = client.get("/readyz")
        assert warming.status_code == 503 and warming.json()["error"]["code"] == "not_ready"
        early = client.post("/predict", content=png(), headers={"content-type": "image/png"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        SlowWarmUpEngine.release.set()
        until = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < until, "never became ready"
            time.sleep(0.02)
        answer = client.post("/predict", content=png(), headers={"content-type": "image/png", "X-Request-ID": "abc-1"})
        assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "abc-1"
        assert answer.json()["request_id"] == "abc-1" and len(answer.json()["predictions"][0]["top_k"]) == 5
        predictor = app.state.predictor
        predictor.state = "draining"  # what the lifespan's shutdown does first
        draining = client.get("/readyz")
        assert draining.status_code == 503 and draining.json()["error"]["code"] == "draining"
        refused = client.post("/predict", content=png(), headers={"content-type": "image/png"})
        assert refused.json()["error"]["code"] == "draining"
        predictor.state = "ready"
    finally:
        server.stop()
    assert predictor.state == "stopped"


def test_api_docs_load_their_assets_from_the_app_not_a_cdn() -> None:
    import asyncio
    import re

    app = create_app(Settings(device="cpu"), registry=CollectorRegistry(), engine_factory=build_engine)

    async def fetch_docs() -> dict[str, httpx.Response]:
        # no lifespan: the docs need no model
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://docs.test") as client:
            pages = {path: await client.get(path) for path in ("/docs", "/redoc")}
            assets = {url for page in pages.values()
                      for url in re.findall(r'(?:src|href)="([^"]+)"', page.text)}
            assert assets, "the docs pages reference no scripts or styles"
            external = [url for url in assets if re.match(r"(?:[a-z]+:)?//", url)]
            assert not external, f"docs assets fetched from outside the app: {external}"
            return {**pages, **{url: await client.get(url) for url in assets}}

    for url, response in asyncio.run(fetch_docs()).items():
        assert response.status_code == 200 and response.content, url
