"""Admission and fair order (``service.admission``), deadlines from a proxy (``service.deadlines``), and the
batcher dropping late work: pure functions and a ``MicroBatcher`` over a fake engine, with a fake clock where
time matters."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
import torch
from prometheus_client import CollectorRegistry

from robustnorm import parse_policy
from service.admission import ACTIVE_SECONDS, FairQueue, Rate, TenantQuota
from service.batcher import Batch, BatchKey, MicroBatcher, collect_batch
from service.deadlines import MAX_PROXY_LAG, accepted_at, proxy_start
from service.errors import DeadlineExceeded, Overloaded, QueueFull, TenantQueueFull, TenantRateExceeded
from service.metrics import Metrics

POLICY = parse_policy("adaptive:8")


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class Item:
    name: str
    size: int
    tenant: str | None = None
    order: float = 0.0

    @property
    def key(self) -> BatchKey:
        return BatchKey(POLICY, self.tenant)


def names(items: list[Item]) -> list[str]:
    return [item.name for item in items]


def rate(image_seconds: float, batch_seconds: float) -> Rate:
    measured = Rate()
    measured.image_seconds, measured.batch_seconds = image_seconds, batch_seconds
    return measured


# -- fair order ---------------------------------------------------------------------------------------------


def test_one_tenant_is_served_first_come_first_served() -> None:
    queue: FairQueue[Item] = FairQueue(limit=64, clock=Clock())
    for name, size in (("a", 3), ("b", 1), ("c", 2)):
        queue.push([Item(name, size)])
    assert names(queue.items) == ["a", "b", "c"] and queue.images == 6


def test_a_tenant_with_a_backlog_waits_behind_it_not_in_front_of_others() -> None:
    queue: FairQueue[Item] = FairQueue(limit=64, clock=Clock())
    queue.push([Item(f"heavy{i}", 4, "heavy") for i in range(5)])  # one request of 20 images, in chunks
    queue.push([Item("light", 1, "light")])
    assert names(queue.items)[:2] == ["heavy0", "light"]
    assert queue.images_ahead("light") == 5 and queue.images_ahead("heavy") == 21
    queue.started(queue.remove(queue.items[:2]))
    queue.push([Item("light2", 1, "light")])  # a newcomer starts from the virtual time of the work sent
    assert names(queue.items)[0] == "light2"


def test_the_images_ahead_of_a_tenant_are_those_with_tags_up_to_its_start() -> None:
    generator = random.Random(0)
    queue: FairQueue[Item] = FairQueue(limit=10_000, clock=Clock())
    tenants = ["a", "b", "c", None]
    for step in range(400):
        tenant = generator.choice(tenants)
        queue.push([Item(f"{tenant}{step}.{chunk}", generator.randint(1, 8), tenant)
                    for chunk in range(generator.randint(1, 3))])
        if step % 7 == 0:
            queue.started(queue.remove(queue.items[:generator.randint(0, 5)]))
        if step % 11 == 0 and queue.items:
            queue.remove([generator.choice(queue.items)])  # a client gone mid-queue
        for asking in [*tenants, "newcomer"]:
            start = max(queue._virtual, queue._finish.get(asking, 0.0))
            expected = sum(item.size for item in queue.items if item.order <= start)
            assert queue.images_ahead(asking) == expected


def test_the_fair_state_of_idle_tenants_is_bounded() -> None:
    clock = Clock()
    queue: FairQueue[Item] = FairQueue(limit=4, clock=clock)
    for index in range(100):  # a flood of tenants that each send one image, while the queue is never empty
        queue.push([Item(f"t{index}", 1, f"t{index}")])
        queue.started(queue.remove(queue.items[:1]))
    assert len(queue._finish) <= 4 * 4 + 1 and queue.images == 0 and queue._held == {}
    clock.now += ACTIVE_SECONDS
    queue.started([])
    assert queue._seen == {}


# -- the door -----------------------------------------------------------------------------------------------


def test_a_tenant_beyond_its_share_is_refused_while_others_are_active() -> None:
    clock = Clock()
    queue: FairQueue[Item] = FairQueue(limit=16, tenant_share=0.5, clock=clock)
    measured = rate(0.001, 0.01)
    queue.push([Item("h", 12, "heavy")])  # alone, a tenant may fill the whole queue
    queue.admit(4, "heavy", deadline=clock.now + 10, rate=measured, running_left=0)
    queue.push([Item("l", 1, "light")])
    with pytest.raises(TenantQueueFull) as refused:
        queue.admit(1, "heavy", deadline=clock.now + 10, rate=measured, running_left=0)
    assert refused.value.status_code == 429 and refused.value.code == "tenant_share"
    assert int(refused.value.headers()["Retry-After"]) >= 1
    queue.admit(2, "light", deadline=clock.now + 10, rate=measured, running_left=0)
    # A tenant with nothing queued may always queue one request (up to the queue's own limit).
    queue.admit(3, "newcomer", deadline=clock.now + 10, rate=measured, running_left=0)
    with pytest.raises(QueueFull) as full:
        queue.admit(4, "newcomer", deadline=clock.now + 10, rate=measured, running_left=0)
    assert full.value.code == "queue_full"


def test_the_share_lasts_while_another_tenant_was_active_recently() -> None:
    clock = Clock()
    queue: FairQueue[Item] = FairQueue(limit=16, tenant_share=0.5, clock=clock)
    queue.push([Item("l", 1, "light")])
    queue.remove(list(queue.items))
    assert queue.tenant_limit("heavy") == 8
    clock.now += ACTIVE_SECONDS
    assert queue.tenant_limit("heavy") == 16


def test_work_that_would_be_answered_after_its_deadline_is_refused_at_the_door() -> None:
    clock = Clock()
    queue: FairQueue[Item] = FairQueue(limit=512, clock=clock)
    measured = rate(0.01, 0.05)
    queue.push([Item(f"q{i}", 10) for i in range(10)])  # 100 images ahead: 1 s
    queue.admit(1, None, deadline=clock.now + 1.2, rate=measured, running_left=0.1)  # 0.1 + 1.0 + 0.05
    with pytest.raises(Overloaded) as refused:
        queue.admit(1, None, deadline=clock.now + 1.1, rate=measured, running_left=0.1)
    assert refused.value.code == "overloaded" and refused.value.headers()["Retry-After"] == "1"
    # Before any batch ran there is nothing to estimate from: only the limits apply.
    FairQueue(limit=512, clock=clock).admit(1, None, deadline=clock.now + 0.001, rate=Rate(), running_left=0)


# -- X-Request-Start ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    ("t=1796567000.123", 1796567000.123),  # nginx: t=${msec}
    ("t=1796567000123456", 1796567000.123456),  # HAProxy: t=%[date(0,us)]
    ("t=1796567000123", 1796567000.123),  # milliseconds
    ("1796567000", 1796567000.0),
    (" t=1796567000.5 ", 1796567000.5),
])
def test_request_start_formats(value: str, seconds: float) -> None:
    assert proxy_start(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "t=", "t=abc", "t=-5", "t=nan", "t=inf", "t=0", "soon"])
def test_unreadable_request_starts_name_no_time(value: str) -> None:
    assert proxy_start(value) is None


def test_a_trusted_request_start_moves_the_deadline_back_never_forward() -> None:
    first_byte = time.monotonic()
    two_seconds_ago = f"t={int((time.time() - 2) * 1e6)}"
    assert accepted_at(first_byte, two_seconds_ago, trusted=True) == pytest.approx(first_byte - 2, abs=0.05)
    assert accepted_at(first_byte, two_seconds_ago, trusted=False) == first_byte
    assert accepted_at(first_byte, f"t={time.time() + 60:.3f}", trusted=True) == first_byte  # clock ahead
    assert accepted_at(first_byte, f"t={time.time() - 2 * MAX_PROXY_LAG:.3f}", trusted=True) == first_byte
    assert accepted_at(first_byte, "garbage", trusted=True) == first_byte
    assert accepted_at(first_byte, None, trusted=True) == first_byte


# -- the batcher drops late work ----------------------------------------------------------------------------


class SlowEngine:
    def __init__(self, *delays: float) -> None:
        self.delays = list(delays)
        self.ran: list[float] = []

    async def __call__(self, batch: Batch[float]) -> Mapping[str, list[float]]:
        await asyncio.sleep(self.delays.pop(0) if len(self.delays) > 1 else self.delays[0])
        self.ran += [float(value) for item in batch.items for value in item.pixels.flatten()]
        return {item.id: [float(value) for value in item.pixels.flatten()] for item in batch.items}


def images(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


@dataclass(frozen=True)
class Timed:
    name: str
    deadline: float
    size: int = 1
    enqueued_at: float = 10.0
    key: BatchKey = field(default_factory=lambda: BatchKey(POLICY))


def test_the_margin_drops_what_a_batch_could_not_answer_in_time() -> None:
    queue = [Timed("tight", deadline=10.05), Timed("roomy", deadline=10.5)]
    collected = collect_batch(queue, 10.0, max_batch_size=8, max_wait=0.0, margin=0.1)
    assert [item.name for item in collected.expired] == ["tight"]
    assert [item.name for item in collected.batch] == ["roomy"]


def test_the_margin_covers_batches_slower_than_the_average() -> None:
    steady, uneven = Rate(), Rate()
    for _ in range(10):
        steady.observe(32, 0.05)
        steady.observe(32, 0.05)
        uneven.observe(32, 0.04)
        uneven.observe(32, 0.06)
    assert steady.slow_batch_seconds == pytest.approx(0.05)
    assert uneven.batch_seconds == pytest.approx(0.05, abs=0.003)
    assert uneven.slow_batch_seconds >= 0.06


def test_work_a_slower_batch_would_answer_late_is_dropped_before_the_engine() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        clock = Clock(0.0)
        took = [0.04, 0.06] * 5 + [0.04]
        engine = SlowEngine(0.0)

        async def run_batch(batch: Batch[float]) -> Mapping[str, list[float]]:
            clock.now += took.pop(0)
            return await engine(batch)

        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait=0.0, queue_limit=64, eager=True,
                               metrics=Metrics(registry, max_batch_size=4), clock=clock)
        batcher.start()
        for value in range(10):  # batches of 0.04 and 0.06 s in turn: 0.05 s on average
            await batcher.submit(images(value), key=BatchKey(POLICY), deadline=clock.now + 5)
        # 0.055 s left: more than the average batch, less than a slow one. The next batch would take 0.04 s, but
        # that is luck: it is dropped rather than started.
        with pytest.raises(DeadlineExceeded) as dropped:
            await batcher.submit(images(10), key=BatchKey(POLICY), deadline=clock.now + 0.055)
        assert dropped.value.stage == "queue"
        assert 10.0 not in engine.ran and late(registry, "requests", "queue") == 1
        await batcher.stop()

    asyncio.run(main())


def late(registry: CollectorRegistry, kind: str, stage: str) -> float:
    return registry.get_sample_value(f"robustnorm_late_dropped_{kind}_total", {"stage": stage}) or 0.0


def test_work_with_less_time_left_than_a_batch_takes_is_dropped_before_the_engine() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        engine = SlowEngine(0.05, 0.4, 0.05)  # the second batch takes far longer than the first
        batcher = MicroBatcher(engine, max_batch_size=4, max_wait=0.0, queue_limit=64, eager=True,
                               metrics=Metrics(registry, max_batch_size=4))
        batcher.start()
        await batcher.submit(images(1), key=BatchKey(POLICY), deadline=time.monotonic() + 5)  # measures a batch
        busy = asyncio.ensure_future(batcher.submit(images(2), key=BatchKey(POLICY), deadline=time.monotonic() + 5))
        await asyncio.sleep(0.01)
        # Admitted (batches took 0.05 s so far), then still queued when the slow batch ends with less time left
        # than a batch takes: dropped there, before it reaches the engine.
        doomed = batcher.submit(images(3, 4), key=BatchKey(POLICY), deadline=time.monotonic() + 0.3)
        with pytest.raises(DeadlineExceeded) as dropped:
            await doomed
        assert dropped.value.stage == "queue"
        await busy
        assert engine.ran == [1.0, 2.0], "the doomed images never ran"
        assert late(registry, "images", "queue") == 2 and late(registry, "requests", "queue") == 1
        await batcher.stop()

    asyncio.run(main())


def test_an_answer_ready_after_the_deadline_is_a_504_not_a_late_200() -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        clock = Clock(0.0)
        engine = SlowEngine(0.0)

        async def run_batch(batch: Batch[float]) -> Mapping[str, list[float]]:
            clock.now += 10.0  # the forward pass took the request past its deadline
            return await engine(batch)

        batcher = MicroBatcher(run_batch, max_batch_size=4, max_wait=0.0, queue_limit=64, eager=True,
                               metrics=Metrics(registry, max_batch_size=4), clock=clock)
        batcher.start()
        with pytest.raises(DeadlineExceeded) as dropped:
            await batcher.submit(images(1, 2), key=BatchKey(POLICY), deadline=5.0)
        assert dropped.value.stage == "answer"
        assert late(registry, "images", "answer") == 2 and late(registry, "requests", "answer") == 1
        await batcher.stop()

    asyncio.run(main())


def test_requests_being_answered_are_bounded_and_shared_between_tenants() -> None:
    clock = Clock()
    queue: FairQueue[Item] = FairQueue(limit=512, tenant_share=0.5, max_active=4, clock=clock)
    measured = rate(0.001, 0.01)

    def admit(tenant: str, *, arriving: bool = True) -> None:
        queue.admit(1, tenant, deadline=clock.now + 10, rate=measured, running_left=0, arriving=arriving)

    with contextlib.ExitStack() as working:
        for _ in range(4):  # alone, a tenant may take every place
            admit("heavy")
            working.enter_context(queue.working("heavy"))
        with pytest.raises(Overloaded):
            admit("heavy")
        admit("heavy", arriving=False)  # a request already counted is not refused for the bound again
        for _ in range(2):  # below its share, a newcomer goes beyond the bound ...
            admit("light")
            working.enter_context(queue.working("light"))
        with pytest.raises(TenantQueueFull):  # ... up to its share
            admit("light")
        with pytest.raises(TenantQueueFull):  # and the first tenant now has more than its share
            queue.active["heavy"] -= 2
            admit("heavy")
        queue.active["heavy"] += 2
    assert sum(queue.active.values()) == 0


# -- a quota per tenant -------------------------------------------------------------------------------------


def test_a_tenant_over_its_rate_quota_is_refused_and_the_others_are_not() -> None:
    clock = Clock()
    queue: FairQueue[Item] = FairQueue(limit=512, tenant_rate=50.0, clock=clock)  # bursts of 5
    measured = rate(0.001, 0.01)

    def admit(tenant: str | None, working: contextlib.ExitStack) -> None:
        queue.admit(1, tenant, deadline=clock.now + 10, rate=measured, running_left=0)
        working.enter_context(queue.working(tenant))

    with contextlib.ExitStack() as working:
        for _ in range(5):
            admit("heavy", working)
        with pytest.raises(TenantRateExceeded) as refused:
            admit("heavy", working)
        assert refused.value.status_code == 429 and refused.value.code == refused.value.reason == "tenant_rate"
        assert refused.value.retry_after == pytest.approx(1 / 50)
        assert refused.value.headers() == {"Retry-After": "1"}
        queue.admit(1, "heavy", deadline=clock.now + 10, rate=measured, running_left=0, arriving=False)  # counted
        for _ in range(5):
            admit("light", working)  # another tenant has a bucket of its own
        for _ in range(20):
            admit(None, working)  # requests that name no tenant have no quota
        clock.now += 1 / 50  # one token back
        admit("heavy", working)
        with pytest.raises(TenantRateExceeded):
            admit("heavy", working)


def test_a_tenant_sending_ten_times_its_quota_is_admitted_its_quota() -> None:
    clock = Clock()
    queue: FairQueue[Item] = FairQueue(limit=512, tenant_rate=100.0, clock=clock)
    measured = rate(0.001, 0.01)
    admitted = 0
    for _ in range(5000):  # 1,000 requests a second for 5 s
        clock.now += 0.001
        try:
            queue.admit(1, "heavy", deadline=clock.now + 10, rate=measured, running_left=0)
        except TenantRateExceeded:
            continue
        with queue.working("heavy"):
            admitted += 1
    assert 500 <= admitted <= 500 + 10  # the quota's 100 a second, and at most one burst of 10 more


def test_the_quota_state_of_tenants_named_by_a_header_is_bounded() -> None:
    clock = Clock()
    quota = TenantQuota(100.0, clock)
    for index in range(20_000):  # a tenant name per request, 1,000 a second
        clock.now += 0.001
        quota.check(f"tenant-{index}")
        quota.take(f"tenant-{index}")
    assert len(quota._buckets) <= 8192
