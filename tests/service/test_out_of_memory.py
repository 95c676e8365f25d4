"""A batch that runs out of memory is split and run again in halves: every request answered, with the answers
of an unsplit run (frozen statistics), and a single request that cannot be split fails alone with a 500."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

import httpx
import torch
from prometheus_client import CollectorRegistry
from service_support import LiveServer, Sample

import robustnorm
from robustnorm.policy import Policy
from service.app import create_app
from service.engines import BatchReport, DriftWhen, GroupSpec, TorchEngine
from service.settings import Settings

LIMIT = 2  # images the test engine runs at once before it "runs out of memory"


class SmallMemoryEngine(TorchEngine):
    """The real engine, but batches of more than LIMIT images raise PyTorch's out-of-memory error."""

    attempts: ClassVar[list[int]] = []

    def run(self, pixels: torch.Tensor, groups: Sequence[GroupSpec], policy: Policy, *, drift: DriftWhen = "now"
            ) -> tuple[torch.Tensor, BatchReport]:
        images = sum(group.size for group in groups)
        type(self).attempts.append(images)
        if images > LIMIT and self.warmed_up:
            raise torch.OutOfMemoryError(f"test: {images} images do not fit")
        return super().run(pixels, groups, policy, drift=drift)

    warmed_up = False

    def warm_up(self) -> None:
        super().warm_up()  # every batch shape once, with all the memory it needs
        self.warmed_up = True


def build_engine(settings: Settings) -> TorchEngine:
    model, card = robustnorm.load_model(settings.model)
    return SmallMemoryEngine(model.eval(), card, device=torch.device("cpu"), policy=robustnorm.parse_policy("frozen"),
                             max_batch_size=settings.max_batch_size, padding=False)


def test_a_batch_out_of_memory_runs_again_in_halves(model_dir, cifar_samples: list[Sample]) -> None:
    settings = Settings(model=str(model_dir), device="cpu", max_batch_size=16, eager_batches=False, max_wait=0.5,
                        policy="frozen")
    app = create_app(settings, registry=CollectorRegistry(), engine_factory=build_engine)
    server = LiveServer(app)
    server.start()
    samples = cifar_samples[:6]
    try:
        SmallMemoryEngine.attempts.clear()

        async def send_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/predict", content=s.png,
                                                          headers={"content-type": "image/png"}) for s in samples))

        responses = asyncio.run(send_all())
        assert [r.status_code for r in responses] == [200] * len(samples), [r.text for r in responses]
        attempts = SmallMemoryEngine.attempts
        assert max(attempts) > LIMIT, f"no batch was large enough to split: {attempts}"
        with httpx.Client(base_url=server.url, timeout=30) as client:  # one image per batch: never split
            alone = [client.post("/predict", content=s.png, headers={"content-type": "image/png"}) for s in samples]
        for split, single in zip(responses, alone):
            ranked = [[c["index"] for c in r.json()["predictions"][0]["top_k"]] for r in (split, single)]
            assert ranked[0] == ranked[1]
            assert abs(split.json()["predictions"][0]["score"] - single.json()["predictions"][0]["score"]) < 1e-5
        files = [("image", (f"{i}.png", s.png, "image/png")) for i, s in enumerate(samples[:3])]
        too_big = httpx.post(f"{server.url}/predict", files=files, timeout=30)  # one request of 3: cannot split
        assert too_big.status_code == 500 and too_big.json()["error"]["code"] == "inference_failed", too_big.text
        assert httpx.post(f"{server.url}/predict", content=samples[0].png,
                          headers={"content-type": "image/png"}, timeout=30).status_code == 200
    finally:
        server.stop()
