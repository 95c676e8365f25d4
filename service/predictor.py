"""The predictor: decoding, micro-batcher, engine, metrics and drift state behind one object, without HTTP.

The HTTP layer only calls :meth:`Predictor.decode`, :meth:`Predictor.predict` and reads its state; a later
front end (several HTTP worker processes feeding one batcher on a GPU) can drive the same object over IPC.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from .batcher import Batch, BatchKey, MicroBatcher
from .engine import GroupReport, ImageOutput, TorchEngine, canonical_policy
from .engine_onnx import create_engine
from .errors import DeadlineExceeded, Draining, InvalidRequest, NotReady, Unavailable
from .imaging import Preprocessing, decode_images
from .metrics import Metrics
from .settings import Settings

logger = logging.getLogger(__name__)

State = Literal["starting", "warming_up", "ready", "draining", "stopped", "failed"]
EngineFactory = Callable[[Settings], TorchEngine]


@dataclass(frozen=True)
class Totals:
    """Counts since start, for /v1/stats."""

    batches: int = 0
    images: int = 0
    fallback_groups: int = 0


class Predictor:
    """Everything between a decoded request and its answer."""

    def __init__(self, settings: Settings, metrics: Metrics, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine_factory = engine_factory or create_engine
        self.state: State = "starting"
        self.failure: str | None = None
        self.latest: GroupReport | None = None
        self.totals = Totals()
        self._engine: TorchEngine | None = None
        self._batcher: MicroBatcher[ImageOutput] | None = None
        self._preprocessing: Preprocessing | None = None
        self._decoder = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="robustnorm-decode")
        self._warm_up_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (errors propagate: the service must not start without it), then warm up in the
        background; the predictor is ready once the warm-up is done."""
        engine = await asyncio.to_thread(self._engine_factory, self.settings)
        self._engine = engine
        self._preprocessing = engine.preprocessing(self.settings.max_image_pixels)
        card = engine.card
        self.metrics.set_model(model=card.name, version=card.version, norm=card.norm, policy=engine.policy)
        self._batcher = MicroBatcher(
            self._run_batch, max_batch_size=self.settings.max_batch_size, max_wait=self.settings.max_wait,
            queue_limit=self.settings.queue_limit, share_tenants=self.settings.isolation == "grouped",
            metrics=self.metrics)
        self._batcher.start()
        self.state = "warming_up"
        self._warm_up_task = asyncio.create_task(self._warm_up(), name="robustnorm-warm-up")

    async def _warm_up(self) -> None:
        assert self._engine is not None
        try:
            await self._engine.warm_up()
        except Exception as error:
            logger.exception("warm-up failed; the service stays unready")
            self.state, self.failure = "failed", f"warm-up failed: {type(error).__name__}: {error}"
        else:
            if self.state == "warming_up":
                self.state = "ready"
                logger.info("ready to serve %s", self.engine.card.name)

    async def stop(self) -> None:
        """Drain: no new requests, queued ones answered (up to ``drain_timeout``), then stop."""
        if self.state == "stopped":
            return
        self.state = "draining"
        if self._warm_up_task is not None:
            await asyncio.gather(self._warm_up_task, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.drain(self.settings.drain_timeout)
            await self._batcher.stop()
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.state = "stopped"

    # -- state -----------------------------------------------------------------------------------------
    @property
    def engine(self) -> TorchEngine:
        if self._engine is None:
            raise NotReady("the model is still loading; retry shortly")
        return self._engine

    @property
    def preprocessing(self) -> Preprocessing:
        if self._preprocessing is None:
            raise NotReady("the model is still loading; retry shortly")
        return self._preprocessing

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._batcher is not None and self._batcher.alive

    def check_ready(self) -> None:
        """Raise the 503 that says why the predictor cannot take a request now."""
        if self._batcher is not None and self._batcher.failure is not None:
            raise Unavailable(f"{self._batcher.failure}; the service must be restarted")
        if self.state == "failed":
            raise Unavailable(f"{self.failure}; the service must be restarted")
        if self.state in ("draining", "stopped"):
            raise Draining("the service is shutting down and takes no new requests; retry on another replica")
        if self.state != "ready":
            raise NotReady("the model is still loading or warming up; retry shortly")

    @property
    def queued_images(self) -> int:
        return self._batcher.queued_images if self._batcher is not None else 0

    def resolve_policy(self, requested: str | None) -> str:
        """The effective policy of a request: its own when overrides are allowed, else the service's."""
        if requested is None:
            return self.engine.policy
        if not self.settings.allow_policy_override:
            raise InvalidRequest("this service does not accept a per-request policy (the operator can allow it "
                                 "with ROBUSTNORM_ALLOW_POLICY_OVERRIDE=true); leave out 'policy'")
        try:
            return canonical_policy(requested)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None

    # -- work ------------------------------------------------------------------------------------------
    async def decode(self, blobs: Sequence[bytes], deadline: float) -> torch.Tensor:
        """Decode a request's images on the decoding threads (400/413/415 on bad input, 504 past ``deadline``,
        a ``time.monotonic()`` value: the thread stops at the next image, so it is soon free for others)."""
        decode = functools.partial(decode_images, blobs, self.preprocessing,
                                   max_total_pixels=self.settings.max_request_pixels, deadline=deadline)
        work = asyncio.get_running_loop().run_in_executor(self._decoder, decode)
        try:
            return await asyncio.wait_for(work, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while its images were waiting for or in "
                                   "decoding") from None

    async def predict(self, pixels: torch.Tensor, *, policy: str, tenant: str | None, top_k: int,
                      deadline: float, request_id: str) -> list[ImageOutput]:
        """Queue decoded images and wait for their answers, in order, until ``deadline`` (monotonic)."""
        self.check_ready()
        assert self._batcher is not None
        key = BatchKey(policy=policy, tenant=tenant if self.settings.batch_key != "none" else None)
        return await self._batcher.submit(pixels, key=key, top_k=top_k, deadline=deadline, request_id=request_id)

    async def _run_batch(self, batch: Batch[ImageOutput]) -> dict[str, list[ImageOutput]]:
        output = await self.engine.run(batch)
        self.metrics.observe_batch(
            images=output.images, seconds=output.seconds, statistics=[g.statistics for g in output.groups],
            fallback=[g.fallback for g in output.groups], batch_scores=[g.batch_score for g in output.groups],
            image_scores=output.image_scores, layers=output.layers)
        self.latest = output.groups[-1]
        self.totals = Totals(batches=self.totals.batches + 1, images=self.totals.images + output.images,
                             fallback_groups=self.totals.fallback_groups + sum(g.fallback for g in output.groups))
        return output.results
