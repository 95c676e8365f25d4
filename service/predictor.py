"""The predictor: decoding, micro-batcher, engine, metrics and drift state behind one object, without HTTP.

The HTTP layer only calls :meth:`Predictor.decode`, :meth:`Predictor.predict` and reads its state; a later
front end (several HTTP worker processes feeding one batcher on a GPU) can drive the same object over IPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import torch

import robustnorm
from robustnorm.policy import Policy

from .batcher import Arrival, Batch, BatchKey, MicroBatcher
from .engines import BatchDrift, BatchReport, Engine, GroupOutcome, GroupSpec, load_engine
from .errors import DeadlineExceeded, Draining, InvalidRequest, NotReady, Unavailable
from .imaging import Preprocessing, decode_images, decode_opened, open_images
from .metrics import Metrics
from .settings import Settings

logger = logging.getLogger(__name__)

# A request this small is decoded on the event loop, not on a decoding thread (Predictor.decode).
INLINE_DECODE_BYTES = 16 * 1024
INLINE_DECODE_PIXELS = 64 * 64 * 4
# Seconds a batch's drift scoring waits for the next forward pass to start, at most (see Predictor._defer_drift).
DRIFT_IDLE_DELAY = 0.02

State = Literal["starting", "warming_up", "ready", "draining", "stopped", "failed"]
EngineFactory = Callable[[Settings], Engine]


@dataclass(frozen=True)
class Totals:
    """Counts since start, for /v1/stats."""

    batches: int = 0
    images: int = 0
    fallback_groups: int = 0


@dataclass(frozen=True)
class GroupPlace:
    """The statistics group an image ran in: its forward pass, its place in it and what ran."""

    batch_id: str
    index: int
    policy: str
    outcome: GroupOutcome
    layers: dict[str, dict[str, float]]  # layer -> measure -> drift of this group
    inference_seconds: float
    finished_at: float  # wall-clock time (time.time()) the forward finished


@dataclass(frozen=True)
class ImageAnswer:
    """One image's result: its classes from the most to the least probable with their probabilities, its drift
    score and group."""

    classes: list[int]
    scores: list[float]
    drift_score: float | None
    group: GroupPlace


def _group_layers(report: BatchReport, g: int) -> dict[str, dict[str, float]]:
    """Group ``g``'s per-layer drift from a report's layer -> measure -> one value per group."""
    return {layer: {measure: values[g] for measure, values in measures.items()} for layer, measures in
            report.layers.items()}


def _places(batch: Batch[ImageAnswer], report: BatchReport) -> list[GroupPlace]:
    finished_at = time.time()
    return [GroupPlace(batch_id=batch.id, index=g, policy=str(batch.policy), outcome=outcome,
                       layers=_group_layers(report, g),
                       inference_seconds=report.seconds, finished_at=finished_at)
            for g, outcome in enumerate(report.groups)]


def split_answers(batch: Batch[ImageAnswer], probabilities: torch.Tensor, report: BatchReport
                  ) -> dict[str, list[ImageAnswer]]:
    """Each work item's answers, one per image in order, routed by the item's id."""
    places = _places(batch, report)
    ranked, order = probabilities.sort(dim=1, descending=True, stable=True)  # one sort for the batch, not per image
    scores, classes = ranked.tolist(), order.tolist()
    results: dict[str, list[ImageAnswer]] = {}
    row = 0
    for g, group_items in enumerate(batch.groups):
        for item in group_items:
            rows = range(row, row + item.size)
            results[item.id] = [ImageAnswer(classes=classes[r], scores=scores[r], group=places[g],
                                            drift_score=report.image_scores[r] if report.image_scores else None)
                                for r in rows]
            row += item.size
    return results


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device (or the host) ran out of memory."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def split_batch(batch: Batch[ImageAnswer]) -> tuple[Batch[ImageAnswer], Batch[ImageAnswer]] | None:
    """Two halves of a batch to run one after the other, or None for one request (its images stay together):
    whole statistics groups where there are several, else the one group's requests in two groups (each then
    normalised with its own batch statistics under a batch policy; frozen and stream statistics are unchanged)."""
    if len(batch.groups) > 1:
        middle = len(batch.groups) // 2
        parts = [batch.groups[:middle], batch.groups[middle:]]
    elif len(batch.items) > 1:
        middle = len(batch.items) // 2
        parts = [[batch.items[:middle]], [batch.items[middle:]]]
    else:
        return None
    first, second = (replace(batch, id=f"{batch.id}.{i}", groups=groups) for i, groups in enumerate(parts, 1))
    return first, second


class RateBudget:
    """At most ``rate`` events per second, in bursts of up to one second's worth (a token bucket); 0: no limit."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = max(1.0, rate)
        self._refilled = clock()

    def take(self) -> bool:
        """Whether one more event fits now (and count it)."""
        if self.rate <= 0:
            return True
        now = self._clock()
        self._tokens = min(max(1.0, self.rate), self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Predictor:
    """Everything between a decoded request and its answer."""

    def __init__(self, settings: Settings, metrics: Metrics, engine_factory: EngineFactory | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine_factory = engine_factory or load_engine
        self.state: State = "starting"
        self.failure: str | None = None
        self.latest: GroupPlace | None = None
        self.totals = Totals()
        # Per tenant of an API key (a bounded set), when tenants are batched apart by key: what /v1/stats shows
        # a tenant, never another's.
        self.tenant_latest: dict[str, GroupPlace] = {}
        self.tenant_totals: dict[str, Totals] = {}
        self.drain_started: float | None = None
        self._engine: Engine | None = None
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustnorm-engine")
        # Drift scoring for metrics runs here, after the answers have left (drift_metrics 'after' or 'sampled').
        self._drift_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustnorm-drift")
        self._drift_pending = 0
        self._drift_credit = 0.0
        self._drift_rate = RateBudget(settings.drift_max_rate)
        self._drift_waiting: list[Callable[[], None]] = []  # scorings that start with the next forward pass
        self._drift_timer: asyncio.TimerHandle | None = None
        self._batcher: MicroBatcher[ImageAnswer] | None = None
        self._preprocessing: Preprocessing | None = None
        self._decoder = ThreadPoolExecutor(max_workers=settings.decode_workers, thread_name_prefix="robustnorm-decode")
        self._warm_up_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the model (errors propagate: the service must not start without it), then warm up in the
        background; the predictor is ready once the warm-up is done."""
        engine = await asyncio.to_thread(self._engine_factory, self.settings)
        self._engine = engine
        card = engine.card
        channels, height, width = (int(v) for v in card.input_size)
        self._preprocessing = Preprocessing(channels=channels, height=height, width=width, mean=tuple(card.mean),
                                            std=tuple(card.std), max_pixels=self.settings.max_image_pixels)
        self.metrics.set_model(model=card.name, version=card.version, norm=card.norm, policy=str(engine.policy))
        self._batcher = MicroBatcher(
            self._run_batch, max_batch_size=self.settings.max_batch_size, max_wait=self.settings.max_wait,
            eager=self.settings.eager_batches, tenant_share=self.settings.tenant_queue_share,
            max_active=self.settings.max_active_requests, tenant_rate=self.settings.tenant_rate,
            queue_limit=self.settings.queue_limit, share_tenants=self.settings.isolation == "grouped",
            metrics=self.metrics)
        self._batcher.start()
        self.state = "warming_up"
        self._warm_up_task = asyncio.create_task(self._warm_up(), name="robustnorm-warm-up")

    async def _warm_up(self) -> None:
        assert self._engine is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self._engine_thread, self._engine.warm_up)
        except Exception as error:
            logger.exception("warm-up failed; the service stays unready")
            self.state, self.failure = "failed", f"warm-up failed: {type(error).__name__}: {error}"
        else:
            if self.state == "warming_up":
                self.state = "ready"
                logger.info("ready to serve %s", self.engine.card.name)

    def begin_drain(self) -> None:
        """Refuse new requests from now on (503, /readyz too); requests already accepted still run."""
        if self.state in ("draining", "stopped"):
            return
        self.state = "draining"
        self.drain_started = time.monotonic()

    @property
    def draining(self) -> bool:
        return self.state in ("draining", "stopped")

    async def stop(self) -> None:
        """Drain: no new requests, queued ones answered (until ``drain_timeout`` after the drain began), then
        stop."""
        if self.state == "stopped":
            return
        self.begin_drain()
        if self._warm_up_task is not None:
            await asyncio.gather(self._warm_up_task, return_exceptions=True)
        if self._batcher is not None:
            began = self.drain_started if self.drain_started is not None else time.monotonic()
            await self._batcher.drain(self.settings.drain_timeout - (time.monotonic() - began))
            await self._batcher.stop()
        self._engine_thread.shutdown(wait=True, cancel_futures=True)
        if self._drift_timer is not None:
            self._drift_timer.cancel()
        self._drift_waiting.clear()
        self._drift_thread.shutdown(wait=True, cancel_futures=True)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
        self._decoder.shutdown(wait=False, cancel_futures=True)
        self.state = "stopped"

    # -- state -----------------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
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

    def arrived_before_drain(self, first_byte: float | None) -> bool:
        """Whether, while draining, a request whose first byte arrived at ``first_byte`` (monotonic) came before
        the drain began: it was accepted then, and runs."""
        return (self.state == "draining" and self.drain_started is not None and first_byte is not None
                and first_byte < self.drain_started)

    def check_accepting(self, first_byte: float) -> None:
        """:meth:`check_ready`, but a request that arrived before a drain began is still taken."""
        if not self.arrived_before_drain(first_byte):
            self.check_ready()

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

    def resolve_policy(self, requested: str | None) -> Policy:
        """The effective policy of a request: its own when overrides are allowed, else the service's."""
        if requested is None:
            return self.engine.policy
        if not self.settings.allow_policy_override:
            raise InvalidRequest("this service does not accept a per-request policy (the operator can allow it "
                                 "with ROBUSTNORM_ALLOW_POLICY_OVERRIDE=true); leave out 'policy'")
        try:
            return robustnorm.parse_policy(requested)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None

    def reset_streams(self, keys: Sequence[str] | None) -> int:
        """Forget per-stream statistics (all streams when ``keys`` is None); how many were dropped."""
        dropped = self.engine.reset_streams(keys)
        logger.info("reset %d stream(s)%s", dropped, "" if keys is None else f" of {len(keys)} named")
        return dropped

    # -- work ------------------------------------------------------------------------------------------
    async def decode(self, blobs: Sequence[bytes], deadline: float) -> torch.Tensor:
        """Decode a request's images on the decoding threads (400/413/415 on bad input, 504 past ``deadline``,
        a ``time.monotonic()`` value: the thread stops at the next image, so it is soon free for others).

        A request of small images (at most ``INLINE_DECODE_BYTES`` encoded and ``INLINE_DECODE_PIXELS``
        decoded, a few 32x32 JPEGs) is decoded here, on the event loop: that takes a few tenths of a
        millisecond, less than handing it to a thread and back."""
        if sum(len(blob) for blob in blobs) <= INLINE_DECODE_BYTES:
            opened = open_images(blobs, self.preprocessing, max_total_pixels=self.settings.max_request_pixels)
            if sum(image.size[0] * image.size[1] for image in opened) <= INLINE_DECODE_PIXELS:
                return decode_opened(opened, self.preprocessing, deadline=deadline)
            decode = functools.partial(decode_opened, opened, self.preprocessing, deadline=deadline)
        else:
            decode = functools.partial(decode_images, blobs, self.preprocessing,
                                       max_total_pixels=self.settings.max_request_pixels, deadline=deadline)
        work = asyncio.get_running_loop().run_in_executor(self._decoder, decode)
        try:
            return await asyncio.wait_for(work, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while its images were waiting for or in "
                                   "decoding") from None

    def _key(self, policy: Policy, tenant: str | None, stream: str | None = None) -> BatchKey:
        return BatchKey(policy=policy, tenant=tenant if self.settings.batch_key != "none" else None, stream=stream)

    def admit(self, count: int, *, policy: Policy, tenant: str | None, deadline: float, arriving: bool = True
              ) -> None:
        """Refuse ``count`` images now (429, 503, 504) if the batcher would: checked before decoding them.
        ``arriving``: the request is not yet counted among those being answered (:meth:`working`)."""
        if self.state != "draining":
            self.check_ready()
        assert self._batcher is not None
        self._batcher.admit(count, key=self._key(policy, tenant), deadline=deadline, arriving=arriving)

    def working(self, tenant: str | None) -> contextlib.AbstractContextManager[Arrival]:
        """Counts a request admitted with :meth:`admit` as being answered (``max_active_requests``), until it
        leaves, and as arriving until :meth:`predict` is given the :class:`~service.batcher.Arrival` it yields."""
        assert self._batcher is not None
        return self._batcher.working(tenant if self.settings.batch_key != "none" else None)

    async def predict(self, pixels: torch.Tensor, *, policy: Policy, tenant: str | None, deadline: float,
                      stream: str | None = None, arrival: Arrival | None = None) -> list[ImageAnswer]:
        """Queue decoded images and wait for their answers, in order, until ``deadline`` (monotonic); under a
        stream policy they join ``stream`` (``None``: the shared stream, see :func:`service.deps.stream_of`). A request
        accepted before a drain began still runs (its images are queued until the drain closes the batcher).
        Answers ready only after the deadline are dropped (504), never returned late."""
        if self.state != "draining":
            self.check_ready()
        assert self._batcher is not None
        answers = await self._batcher.submit(pixels, key=self._key(policy, tenant, stream), deadline=deadline,
                                             arrival=arrival)
        if time.monotonic() > deadline:
            self.metrics.drop_late("answer", len(answers))
            raise DeadlineExceeded("the answer was ready only after the request's deadline; it was dropped", "answer")
        return answers

    def _drift_plan(self) -> str:
        """What becomes of this batch's drift scoring: 'inline', 'after', 'sampled_out' (by the share of
        ``sampled:F``, or beyond ``drift_max_rate``) or 'skipped'."""
        mode = self.settings.drift_metrics
        if mode == "inline":
            return mode
        self._drift_credit += self.settings.drift_share
        if self._drift_credit < 1.0:
            return "sampled_out"
        self._drift_credit -= 1.0
        if not self._drift_rate.take():
            return "sampled_out"
        return "after" if self._drift_pending < 2 else "skipped"  # a bounded backlog: never fall behind

    async def _run_batch(self, batch: Batch[ImageAnswer]) -> dict[str, list[ImageAnswer]]:
        groups = [GroupSpec(size, stream) for size, stream in zip(batch.sizes, batch.streams)]
        pixels = torch.cat([item.pixels for item in batch.items])
        plan = self._drift_plan()
        loop = asyncio.get_running_loop()
        drift = "now" if plan == "inline" else "later" if plan == "after" else "none"
        run = functools.partial(self.engine.run, drift=drift)
        try:
            forward = loop.run_in_executor(self._engine_thread, run, pixels, groups, batch.policy)
            self._start_drift()
            probabilities, report = await forward
        except (torch.OutOfMemoryError, RuntimeError) as error:
            halves = split_batch(batch)
            if not out_of_memory(error) or halves is None:
                raise
            del pixels
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("batch %s of %d images ran out of memory: running it as two batches of %d and %d",
                           batch.id, sum(batch.sizes), sum(halves[0].sizes), sum(halves[1].sizes))
            return {**await self._run_batch(halves[0]), **await self._run_batch(halves[1])}
        results = split_answers(batch, probabilities, report)
        self.metrics.observe_batch(report)
        self.metrics.set_streams(self.engine.stream_count())
        self.totals = Totals(batches=self.totals.batches + 1, images=self.totals.images + report.images,
                             fallback_groups=self.totals.fallback_groups + sum(g.fallback for g in report.groups))
        places = [results[group[0].id][0].group for group in batch.groups]
        self._remember(batch, places)
        if plan == "inline":
            self.metrics.observe_drift(report)
        elif plan == "after" and report.pending is not None:
            self._drift_pending += 1
            self._defer_drift(functools.partial(self._score_drift, batch, report, places))
        else:
            self.metrics.drift_not_scored(plan if plan != "after" else "skipped")
        return results

    def _defer_drift(self, scoring: Callable[[], None]) -> None:
        """Start ``scoring`` with the next forward pass, or after ``DRIFT_IDLE_DELAY`` if none starts.

        Scoring takes the interpreter for a fraction of a millisecond at a time. Started as the answers leave, it
        would run while the clients' next requests are read and decoded, and delay them; started with the next
        forward pass, it runs while the event loop waits for the engine, which holds no interpreter lock in the
        graph."""
        self._drift_waiting.append(scoring)
        if self._drift_timer is None:
            self._drift_timer = asyncio.get_running_loop().call_later(DRIFT_IDLE_DELAY, self._start_drift)

    def _start_drift(self) -> None:
        if self._drift_timer is not None:
            self._drift_timer.cancel()
            self._drift_timer = None
        waiting, self._drift_waiting = self._drift_waiting, []
        for scoring in waiting:
            scoring()

    def _score_drift(self, batch: Batch[ImageAnswer], report: BatchReport, places: list[GroupPlace]) -> None:
        assert report.pending is not None
        scoring = asyncio.get_running_loop().run_in_executor(self._drift_thread, report.pending.compute)
        scoring.add_done_callback(functools.partial(self._scored, batch, report, places))

    def _remember(self, batch: Batch[ImageAnswer], places: list[GroupPlace]) -> None:
        """The latest group (the last of this forward) for /v1/stats, and per tenant its own."""
        self.latest = places[-1]
        if self.settings.batch_key != "api_key":
            return
        for place, tenant in zip(places, batch.tenants):
            if tenant is None:
                continue
            totals = self.tenant_totals.get(tenant, Totals())
            self.tenant_totals[tenant] = Totals(totals.batches + 1, totals.images + place.outcome.size,
                                                totals.fallback_groups + place.outcome.fallback)
            self.tenant_latest[tenant] = place

    def _scored(self, batch: Batch[ImageAnswer], report: BatchReport, places: list[GroupPlace],
                scoring: asyncio.Future[BatchDrift]) -> None:
        """On the event loop, once a batch's drift is scored: metrics, and /v1/stats where it is still the latest."""
        self._drift_pending -= 1
        if scoring.cancelled() or scoring.exception() is not None:
            if not scoring.cancelled():
                logger.error("drift scoring of batch %s failed: %r", batch.id, scoring.exception())
            self.metrics.drift_not_scored("skipped")
            return
        scored = report.with_drift(scoring.result())
        self.metrics.observe_drift(scored)
        updated = [replace(place, outcome=outcome, layers=_group_layers(scored, g))
                   for g, (place, outcome) in enumerate(zip(places, scored.groups))]
        if self.latest is places[-1]:
            self.latest = updated[-1]
        for before, after, tenant in zip(places, updated, batch.tenants):
            if tenant is not None and self.tenant_latest.get(tenant) is before:
                self.tenant_latest[tenant] = after
