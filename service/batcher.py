"""The micro-batcher: queued requests become batches; results go back to the requests they belong to.

A request's images are queued as one work item (or, beyond ``max_batch_size`` images, as several items of
at most ``max_batch_size``), so a request's images stay in one batch where they fit. A batch leaves the
queue when it is full or its oldest item has waited ``max_wait``, or at once when ``eager`` (the default): the
engine runs one batch at a time, so while it is busy the queue fills and batches grow with the load, and an
idle engine keeps a request waiting for company only while other admitted requests are on their way to the
queue (being read or decoded), at most ``max_wait``. Which items a batch takes is decided by
:func:`collect_batch`, a pure function of the queue and a monotonic time. Items whose deadline has passed, or
is nearer than the time a batch takes, are answered 504 and never run; an answer ready only after its deadline
is a 504 too, never a late 200. Which work is queued at all, and in which order between tenants, is decided by
:mod:`service.admission`. The consumer task is supervised: if it dies, every pending request fails at once with
a clear error, and so does every later one.

Items with different batch keys never share a batch, except that with ``share_tenants`` the tenants of one
policy share a forward pass as separate statistics groups (``robustnorm.batch_groups``): batch statistics let
one request change another's answer, so tenants are isolated either way.

Nothing here knows about HTTP or about models: the batcher is given a coroutine that runs a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch

from robustnorm.policy import Policy

from .admission import FairQueue, Rate
from .deadlines import within
from .errors import DeadlineExceeded, Draining, InferenceFailed, Unavailable
from .metrics import Metrics

logger = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True)
class BatchKey:
    """What decides which requests may share a forward pass."""

    policy: Policy  # the effective statistics policy: never mixed within a forward
    tenant: str | None = None  # None when requests are not isolated by tenant
    stream: str | None = None  # the stream its images join under a stream policy (None: the shared stream)


class Queued(Protocol):
    """What :func:`collect_batch` needs to know about a queued item."""

    @property
    def key(self) -> BatchKey: ...
    @property
    def size(self) -> int: ...
    @property
    def enqueued_at(self) -> float: ...
    @property
    def deadline(self) -> float: ...


Q = TypeVar("Q", bound=Queued)


@dataclass
class Arrival:
    """An admitted request on its way to the queue (see :meth:`MicroBatcher.working`)."""

    queued: bool = False


@dataclass(frozen=True)
class Collected(Generic[Q]):
    """What leaves the queue now: a batch to run (possibly empty) and the items past their deadline."""

    batch: list[Q]
    expired: list[Q]
    wake_at: float | None  # when to look again if nothing runs now (None: when something is queued)


def _compatible(head: BatchKey, other: BatchKey, share_tenants: bool) -> bool:
    return head.policy == other.policy and (share_tenants or head.tenant == other.tenant)


def collect_batch(queue: Sequence[Q], now: float, *, max_batch_size: int, max_wait: float,
                  share_tenants: bool = False, eager: bool = False, margin: float = 0.0) -> Collected[Q]:
    """Decide which queued items form the next batch at time ``now`` (``queue`` in the order to serve).

    The first live item (the head) always goes into the next batch, with the later items that share its
    key and still fit, in queue order. The batch runs now when it is full (no room left, or a compatible
    item does not fit) or the head has waited ``max_wait``; otherwise nothing runs and ``wake_at`` says when
    the head's wait or the first deadline ends. Items whose deadline is less than ``margin`` seconds away (the
    time a slow batch takes: they would likely be answered late) are returned as ``expired``.
    """
    expired = [item for item in queue if item.deadline - margin <= now]
    live = [item for item in queue if item.deadline - margin > now]
    if not live:
        return Collected([], expired, None)
    head = live[0]
    batch: list[Q] = []
    room, full = max_batch_size, False
    for item in live:
        if not _compatible(head.key, item.key, share_tenants):
            continue
        assert item.size <= max_batch_size, "requests are split into items of at most max_batch_size"
        if item.size <= room:
            batch.append(item)
            room -= item.size
            if room == 0:
                full = True
                break
        else:
            full = True  # waiting longer cannot make room for it; smaller later items may still fit
    head_due = head.enqueued_at + max_wait
    if full or eager or now >= head_due:
        return Collected(batch, expired, None)
    return Collected([], expired, min(head_due, min(item.deadline - margin for item in live)))


def statistics_groups(items: Sequence[Q], share_tenants: bool) -> list[list[Q]]:
    """Statistics groups of a batch: one per tenant when tenants share a forward pass and, under a stream
    policy, one per stream (each group reads and feeds its own stream); else one group."""
    groups: dict[tuple[str | None, str | None], list[Q]] = {}
    for item in items:
        key = (item.key.tenant if share_tenants else None, item.key.stream if item.key.policy.uses_streams else None)
        groups.setdefault(key, []).append(item)
    return list(groups.values())


@dataclass(eq=False)
class WorkItem(Generic[R]):
    """Images of one request (or a ``max_batch_size`` chunk of them) waiting for their batch."""

    id: str  # "<server-generated request id>:<chunk>": results are routed back by it
    pixels: torch.Tensor  # (k, C, H, W), normalised
    key: BatchKey
    enqueued_at: float
    deadline: float
    future: asyncio.Future[list[R]] = field(repr=False)
    order: float = 0.0  # place in the fair order between tenants (service.admission)

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(eq=False)
class Batch(Generic[R]):
    """A micro-batch: items in statistics groups (consecutive in the batch tensor), all with one policy."""

    id: str
    policy: Policy
    groups: list[list[WorkItem[R]]]

    @property
    def items(self) -> list[WorkItem[R]]:
        return [item for group in self.groups for item in group]

    @property
    def sizes(self) -> list[int]:
        """Real images per statistics group."""
        return [sum(item.size for item in group) for group in self.groups]

    @property
    def tenants(self) -> list[str | None]:
        """The tenant of each statistics group (``None`` where requests are not isolated by tenant)."""
        return [group[0].key.tenant for group in self.groups]

    @property
    def streams(self) -> list[str | None]:
        """The stream of each statistics group (``None``: the shared stream)."""
        return [group[0].key.stream for group in self.groups]


RunBatch = Callable[[Batch[R]], Awaitable[Mapping[str, list[R]]]]
Collect = Callable[..., Collected[WorkItem[R]]]


class MicroBatcher(Generic[R]):
    """Collects submitted images into batches and runs them one at a time with ``run_batch``.

    ``run_batch`` returns, for each item id of the batch, the item's results (one per image).
    ``tenant_share`` is the share of ``queue_limit`` one tenant may hold while others are active.
    """

    def __init__(self, run_batch: RunBatch[R], *, max_batch_size: int, max_wait: float, queue_limit: int,
                 eager: bool = False, tenant_share: float = 1.0, max_active: int | None = None,
                 tenant_rate: float | None = None,
                 share_tenants: bool = False, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, collect: Collect[R] = collect_batch) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.eager = eager
        self.queue_limit = queue_limit
        self.share_tenants = share_tenants
        self._metrics = metrics
        self._clock = clock
        self._collect = collect
        self._queue: FairQueue[WorkItem[R]] = FairQueue(limit=queue_limit, tenant_share=tenant_share,
                                                        max_active=max_active, tenant_rate=tenant_rate,
                                                        batch_size=max_batch_size,
                                                        clock=clock)
        self._arriving = 0  # admitted requests whose images are not queued yet (see working)
        self._running: list[WorkItem[R]] = []
        self._running_since = 0.0
        # Images the last batch answered, and until when an idle engine waits for as many (see _held_for).
        self._returning, self._returning_until = 0, 0.0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: str | None = None
        self._closing = False
        self._stopping = False
        # A batch id is "<process token>-<random>": it names the replica, and says nothing of how many batches
        # ran before (a counter would tell one tenant the others' traffic).
        self._instance = secrets.token_hex(3)
        self._rate = Rate()  # how long batches take lately: for Retry-After, admission and deadline margins

    # -- state -----------------------------------------------------------------------------------------
    @property
    def queued_images(self) -> int:
        return self._queue.images

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the batching loop stopped, if it died."""
        return self._failure

    def retry_after(self) -> float:
        """Seconds until the queued images have likely run, plus a wait."""
        return self._queue.drain_seconds(self._rate, self._running_left()) + self.max_wait

    def _running_left(self) -> float:
        """Seconds the running batch likely still takes."""
        if not self._running:
            return 0.0
        return max(0.0, self._rate.batch_seconds - (self._clock() - self._running_since))

    @contextlib.contextmanager
    def working(self, tenant: str | None) -> Iterator[Arrival]:
        """Count an admitted request as being answered (``max_active``), from admission to its answer, and as
        arriving until :meth:`submit` queues its images (pass it the :class:`Arrival` this yields).

        An eager batch waits for arriving requests: they are on their way, being read and decoded, and a
        batch that leaves without them makes them wait for the next one. It waits no longer than ``max_wait``
        after its oldest image was queued, and leaves as soon as nothing else is arriving or it is full."""
        arrival = Arrival()
        self._arriving += 1
        try:
            with self._queue.working(tenant):
                yield arrival
        finally:
            if self._arrived(arrival):
                self._wakeup.set()  # gone without being queued: a batch that waited for it need not wait any more

    def _arrived(self, arrival: Arrival | None) -> bool:
        """``arrival`` is no longer on its way (queued, or gone); whether it was until now."""
        if arrival is None or arrival.queued:
            return False
        arrival.queued = True
        self._arriving -= 1
        return True

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the batcher is already started")
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="robustnorm-batcher")
        self._task.add_done_callback(self._on_consumer_exit)

    async def drain(self, timeout: float) -> None:
        """Take no new work and wait, up to ``timeout`` seconds, until queued and running work is answered."""
        self._closing = True
        self._wakeup.set()
        until = self._clock() + timeout
        while (self._queue.items or self._running) and self.alive and self._clock() < until:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop the consumer; whatever is still pending fails with 503."""
        self._closing = self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_pending(lambda: Unavailable("the service is shutting down; retry on another replica"))

    def _on_consumer_exit(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        if task.cancelled():
            reason = "the batching loop was cancelled"
            logger.error("%s; failing every pending request", reason)
        else:
            error = task.exception()
            reason = f"the batching loop died ({type(error).__name__}: {error})"
            logger.error("%s; failing every pending request", reason, exc_info=error)
        self._failure = reason
        self._fail_pending(lambda: Unavailable(f"{reason}; the service must be restarted"))

    def _fail_pending(self, make_error: Callable[[], Exception]) -> None:
        for item in [*self._queue.clear(), *self._running]:
            if not item.future.done():
                item.future.set_exception(make_error())
        self._set_queued()

    # -- producer side ---------------------------------------------------------------------------------
    def admit(self, count: int, *, key: BatchKey, deadline: float, arriving: bool = True) -> None:
        """Raise the error that refuses ``count`` images of ``key``'s tenant now, if any: 503 when the batcher
        cannot take work, 504 past the deadline, 429 (with Retry-After) when the tenant holds its share of the
        queue, the queue is full, or its expected wait ends after ``deadline``. Cheap: callers check before
        decoding, and :meth:`submit` checks again."""
        if self._failure is not None:
            raise Unavailable(f"{self._failure}; the service must be restarted")
        if self._closing:
            raise Draining("the service is shutting down and takes no new requests; retry on another replica")
        if self._task is None:
            raise Unavailable("the batcher is not started")
        if deadline <= self._clock():
            raise DeadlineExceeded("the request's deadline passed before it could be queued")
        self._queue.admit(count, key.tenant, deadline=deadline, rate=self._rate, running_left=self._running_left(),
                          arriving=arriving)

    async def submit(self, pixels: torch.Tensor, *, key: BatchKey, deadline: float, arrival: Arrival | None = None
                     ) -> list[R]:
        """Queue a request's images and wait for their results (in image order) until ``deadline``.

        Results are routed back by an id the batcher makes, never by one a client sent.

        Raises the errors of :meth:`admit`, :class:`DeadlineExceeded` (504) when the deadline passes or too
        little time is left for a batch, or :class:`InferenceFailed` (500) if the model raised on the batch.
        """
        count = int(pixels.shape[0])
        self.admit(count, key=key, deadline=deadline, arriving=False)
        now = self._clock()
        loop = asyncio.get_running_loop()
        routing_id = secrets.token_hex(8)
        items = [WorkItem(id=f"{routing_id}:{index}", pixels=chunk, key=key, enqueued_at=now,
                          deadline=deadline, future=loop.create_future())
                 for index, chunk in enumerate(pixels.split(self.max_batch_size))]
        self._queue.push(items)
        self._arrived(arrival)
        self._set_queued()
        self._wakeup.set()
        futures = [item.future for item in items]
        gathered = asyncio.gather(*futures)
        try:
            per_item = await asyncio.wait_for(gathered, timeout=deadline - now)
        except asyncio.TimeoutError:
            running = [item for item in items if any(item is other for other in self._running)]
            stage = "answer" if running else "queue"
            # The wait cancelled the futures of the images without an answer: those are dropped now.
            self._count_late(stage, [item for item in items if item.future.cancelled()], requests=1)
            raise DeadlineExceeded(f"no answer within the request's deadline ({deadline - now:.3f} s); the images "
                                   "were dropped", stage) from None
        except DeadlineExceeded as error:
            if error.stage is not None:
                self._count_late(error.stage, [], requests=1)  # its images were counted where they were dropped
            raise
        finally:
            # A failed, timed-out or cancelled request (its client hung up) leaves the queue at once.
            for future in futures:
                future.cancel()
            self._remove(items)
            if gathered.done() and not gathered.cancelled():
                gathered.exception()  # read, so that asyncio does not log a cancelled wait as an unread error
        return [result for results in per_item for result in results]

    def _set_queued(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queue.images)

    def _remove(self, items: Sequence[WorkItem[R]]) -> None:
        """Take ``items`` out of the queue (those still in it)."""
        if self._queue.remove(items):
            self._set_queued()

    def _count_late(self, stage: str, items: Sequence[WorkItem[R]], requests: int = 0) -> None:
        if self._metrics is not None:
            self._metrics.drop_late(stage, sum(item.size for item in items), requests)

    def _fail_late(self, items: Sequence[WorkItem[R]], stage: str, message: str) -> None:
        """Answer ``items`` 504: their deadline passed, or cannot be met, at ``stage``."""
        late = [item for item in items if not item.future.done()]
        for item in late:
            item.future.set_exception(DeadlineExceeded(message, stage))
        self._count_late(stage, late)

    # -- consumer side ---------------------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._dispatch(batch)

    async def _next_batch(self) -> Batch[R]:
        while True:
            self._remove([item for item in self._queue.items if item.future.done()])  # cancelled by their request
            now = self._clock()
            # An item with less time left than a slower batch than most takes may well be answered late: it is
            # dropped instead, before the engine spends time on it.
            collected = self._collect(self._queue.items, now, max_batch_size=self.max_batch_size,
                                      max_wait=self.max_wait, share_tenants=self.share_tenants,
                                      eager=self.eager and not self._arriving,
                                      margin=self._rate.slow_batch_seconds)
            if collected.expired:
                self._remove(collected.expired)
                self._fail_late(collected.expired, "queue", "the request's deadline passed, or too little time was "
                                "left to run its images, while they waited for a batch; they were dropped")
            wake_at = collected.wake_at
            if collected.batch:
                wake_at = self._held_for(collected.batch, now)
                if wake_at is None:
                    self._remove(collected.batch)
                    self._queue.started(collected.batch)
                    return Batch(id=f"{self._instance}-{secrets.token_hex(6)}",
                                 policy=collected.batch[0].key.policy,
                                 groups=statistics_groups(collected.batch, self.share_tenants))
            self._wakeup.clear()
            timeout = None if wake_at is None else max(0.0, wake_at - now)
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._wakeup.wait(), timeout)

    def _held_for(self, batch: Sequence[WorkItem[R]], now: float) -> float | None:
        """Until when an eager batch waits for more images, or None when it leaves now.

        Clients that got their answers often send their next request at once (a closed loop, a client working
        through a list): after a batch of ``B`` images, the batch that the idle engine would start next with
        fewer than ``B`` images waits for as many, at most ``max_wait`` after the last batch ended. Without it,
        the one image that arrived while a large batch ran leaves alone the moment the engine is free, and the
        answered clients' requests arrive just after it and wait for it, so that batches alternate between one
        image and the rest. Only after a batch of at least a quarter of ``max_batch_size`` (and two images): at
        light load, where batches are small and requests arrive on their own, an idle engine answers at once."""
        if not self.eager or self._closing or now >= self._returning_until:
            return None
        if self._returning < max(2, self.max_batch_size // 4):
            return None
        if sum(item.size for item in batch) >= min(self.max_batch_size, self._returning):
            return None
        return self._returning_until

    async def _dispatch(self, batch: Batch[R]) -> None:
        self._running = batch.items
        started = self._running_since = self._clock()
        if self._metrics is not None:
            for item in self._running:
                self._metrics.queue_wait.observe(started - item.enqueued_at)
        try:
            results = await self._run_batch(batch)
        except Exception:
            logger.exception("batch %s failed on the model", batch.id)
            for item in self._running:
                if not item.future.done():
                    item.future.set_exception(InferenceFailed(
                        f"the model failed on batch {batch.id}; the error is in the service log"))
        else:
            finished = self._clock()
            self._fail_late([item for item in self._running if item.deadline <= finished], "answer",
                            "the answer was ready only after the request's deadline; it was dropped")
            answered = 0
            for item in self._running:
                if not item.future.done():  # a request that timed out meanwhile is simply not answered
                    item.future.set_result(results[item.id])
                    answered += item.size
            self._returning, self._returning_until = answered, finished + self.max_wait
        finally:
            self._running = []
            self._rate.observe(sum(item.size for item in batch.items), self._clock() - started)
