"""The micro-batcher: ``collect_batch`` on its own (pure), then ``MicroBatcher`` with a fake engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
from prometheus_client import CollectorRegistry

from robustnorm import parse_policy
from service.batcher import Batch, BatchKey, MicroBatcher, collect_batch, statistics_groups
from service.errors import DeadlineExceeded, Draining, InferenceFailed, QueueFull, Unavailable
from service.metrics import Metrics

POLICY = parse_policy("adaptive:8")
DEFAULT_KEY = BatchKey(POLICY)


@dataclass(frozen=True)
class Item:
    name: str
    size: int
    enqueued_at: float = 0.0
    deadline: float = 100.0
    key: BatchKey = DEFAULT_KEY


def names(items: list[Item]) -> list[str]:
    return [item.name for item in items]


# -- collect_batch ------------------------------------------------------------------------------------------


def test_an_empty_queue_collects_nothing_and_sleeps_until_woken() -> None:
    collected = collect_batch([], now=5.0, max_batch_size=8, max_wait=0.01)
    assert collected.batch == [] and collected.expired == [] and collected.wake_at is None


def test_waits_for_the_oldest_request_until_max_wait() -> None:
    queue = [Item("a", 2, enqueued_at=1.0), Item("b", 1, enqueued_at=1.004)]
    early = collect_batch(queue, now=1.005, max_batch_size=8, max_wait=0.01)
    assert early.batch == [] and early.wake_at == pytest.approx(1.01)
    due = collect_batch(queue, now=1.01, max_batch_size=8, max_wait=0.01)
    assert names(due.batch) == ["a", "b"]


def test_a_full_batch_leaves_at_once_and_later_requests_wait() -> None:
    queue = [Item("a", 3), Item("b", 5), Item("c", 2)]
    collected = collect_batch(queue, now=0.0, max_batch_size=8, max_wait=1.0)
    assert names(collected.batch) == ["a", "b"]


def test_a_request_that_does_not_fit_stays_whole_and_smaller_ones_fill_the_room() -> None:
    queue = [Item("a", 5), Item("b", 4), Item("c", 3), Item("d", 1)]
    collected = collect_batch(queue, now=0.0, max_batch_size=8, max_wait=1.0)
    # b cannot join without splitting it, so the batch is as full as it gets: it leaves now.
    assert names(collected.batch) == ["a", "c"]


def test_the_oldest_request_always_runs_first() -> None:
    queue = [Item("old", 8, enqueued_at=0.0), Item("new", 1, enqueued_at=0.5)]
    assert names(collect_batch(queue, now=0.0, max_batch_size=8, max_wait=1.0).batch) == ["old"]


def test_expired_requests_are_dropped_before_they_run() -> None:
    queue = [Item("late", 2, deadline=1.0), Item("a", 1, enqueued_at=1.1, deadline=5.0),
             Item("b", 1, enqueued_at=1.1, deadline=1.5)]
    collected = collect_batch(queue, now=1.2, max_batch_size=8, max_wait=0.5)
    assert names(collected.expired) == ["late"]
    assert collected.batch == [] and collected.wake_at == pytest.approx(1.5)  # b's deadline comes first
    later = collect_batch(queue, now=1.6, max_batch_size=8, max_wait=0.5)
    assert names(later.expired) == ["late", "b"] and names(later.batch) == ["a"]


def test_wakes_up_at_the_first_deadline_when_it_comes_before_max_wait() -> None:
    queue = [Item("a", 1, enqueued_at=1.0, deadline=1.003)]
    collected = collect_batch(queue, now=1.001, max_batch_size=8, max_wait=0.01)
    assert collected.batch == [] and collected.wake_at == pytest.approx(1.003)


def test_policies_never_share_a_batch() -> None:
    queue = [Item("a", 1), Item("frozen", 1, key=BatchKey(parse_policy("frozen"))), Item("b", 1)]
    collected = collect_batch(queue, now=10.0, max_batch_size=8, max_wait=0.01)
    assert names(collected.batch) == ["a", "b"]
    rest = collect_batch([queue[1]], now=10.0, max_batch_size=8, max_wait=0.01)
    assert names(rest.batch) == ["frozen"]


def test_tenants_are_separate_batches_unless_they_share_forwards_as_groups() -> None:
    queue = [Item("a1", 1, key=BatchKey(POLICY, "a")), Item("b1", 2, key=BatchKey(POLICY, "b")),
             Item("a2", 1, key=BatchKey(POLICY, "a"))]
    separate = collect_batch(queue, now=10.0, max_batch_size=8, max_wait=0.01)
    assert names(separate.batch) == ["a1", "a2"]
    shared = collect_batch(queue, now=10.0, max_batch_size=8, max_wait=0.01, share_tenants=True)
    assert names(shared.batch) == ["a1", "b1", "a2"]
    assert [names(group) for group in statistics_groups(shared.batch, True)] == [["a1", "a2"], ["b1"]]
    assert [names(group) for group in statistics_groups(shared.batch, False)] == [["a1", "b1", "a2"]]


def test_streams_are_statistics_groups_under_stream_policies_only() -> None:
    streaming = parse_policy("stream:64")
    items = [Item("x1", 1, key=BatchKey(streaming, stream="client:x")),
             Item("y1", 1, key=BatchKey(streaming, stream="client:y")),
             Item("x2", 2, key=BatchKey(streaming, stream="client:x"))]
    batch = collect_batch(items, now=10.0, max_batch_size=8, max_wait=0.01)
    assert names(batch.batch) == ["x1", "y1", "x2"]  # clients still share a forward pass
    assert [names(group) for group in statistics_groups(batch.batch, False)] == [["x1", "x2"], ["y1"]]
    plain = [Item(item.name, item.size, key=BatchKey(POLICY, stream=item.key.stream)) for item in items]
    assert [names(group) for group in statistics_groups(plain, False)] == [["x1", "y1", "x2"]]


# -- MicroBatcher -------------------------------------------------------------------------------------------


class FakeEngine:
    """Answers each image with (batch id, group, position in group, group size, value of the image)."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[Batch[tuple]] = []
        self.delay = delay
        self.fail_on = fail_on

    async def __call__(self, batch: Batch[tuple]) -> Mapping[str, list[tuple]]:
        self.batches.append(batch)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_on is not None and len(self.batches) == self.fail_on:
            raise RuntimeError("the model exploded")
        results = {}
        for g, (group, size) in enumerate(zip(batch.groups, batch.sizes)):
            position = 0
            for item in group:
                results[item.id] = [(batch.id, g, position + i, size, float(item.pixels[i].item()))
                                    for i in range(item.size)]
                position += item.size
        return results


def images(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)


def make_batcher(engine: FakeEngine, **overrides: object) -> MicroBatcher[tuple]:
    options = {"max_batch_size": 4, "max_wait": 0.02, "queue_limit": 16, **overrides}
    return MicroBatcher(engine, **options)  # type: ignore[arg-type]


def submit(batcher: MicroBatcher[tuple], pixels: torch.Tensor, request_id: str, *, timeout: float = 5.0,
           key: BatchKey = DEFAULT_KEY) -> asyncio.Future:
    del request_id  # a label for the reader: the batcher routes by ids of its own
    return asyncio.ensure_future(batcher.submit(pixels, key=key, deadline=time.monotonic() + timeout))


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_results() -> None:
    async def main() -> None:
        engine = FakeEngine()
        registry = CollectorRegistry()
        batcher = make_batcher(engine, metrics=Metrics(registry, max_batch_size=4))
        batcher.start()
        first = submit(batcher, images(1.0), "r1")
        second = submit(batcher, images(2.0, 3.0), "r2")
        one, two = await asyncio.gather(first, second)
        assert len(engine.batches) == 1 and engine.batches[0].sizes == [3]
        assert [r[4] for r in one] == [1.0] and [r[4] for r in two] == [2.0, 3.0]
        assert {r[3] for r in one + two} == {3}
        assert registry.get_sample_value("robustnorm_queue_wait_seconds_count") == 2
        assert registry.get_sample_value("robustnorm_queue_depth") == 0
        await batcher.stop()

    asyncio.run(main())


def test_after_a_batch_an_idle_engine_waits_for_its_clients_to_send_again_and_no_longer() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, eager=True, max_wait=0.4)
        batcher.start()
        # Three clients are answered in one batch...
        await asyncio.gather(*(submit(batcher, images(value), f"r{value}") for value in (1.0, 2.0, 3.0)))
        assert [batch.sizes for batch in engine.batches] == [[3]]
        # ... and send again, one after another: the first waits for the other two, and they run together.
        first = submit(batcher, images(4.0), "r4")
        await asyncio.sleep(0.05)
        assert len(engine.batches) == 1, "the batch left without the clients of the last batch"
        await asyncio.gather(first, *(submit(batcher, images(value), f"r{value}") for value in (5.0, 6.0)))
        assert engine.batches[1].sizes == [3]
        # A lone request after them waits no longer than max_wait after that batch ended.
        started = time.monotonic()
        await submit(batcher, images(7.0), "r7")
        assert 0.3 < time.monotonic() - started < 0.8 and engine.batches[2].sizes == [1]
        # A lone client, answered alone, never waits.
        started = time.monotonic()
        await submit(batcher, images(8.0), "r8")
        assert time.monotonic() - started < 0.2 and engine.batches[3].sizes == [1]
        await batcher.stop()
        # Nor does anyone after a batch of less than a quarter of the largest (light load).
        engine = FakeEngine()
        batcher = make_batcher(engine, eager=True, max_wait=0.4, max_batch_size=16)
        batcher.start()
        await asyncio.gather(*(submit(batcher, images(value), f"r{value}") for value in (1.0, 2.0, 3.0)))
        started = time.monotonic()
        await submit(batcher, images(4.0), "r4")
        assert time.monotonic() - started < 0.2 and [batch.sizes for batch in engine.batches] == [[3], [1]]
        await batcher.stop()

    asyncio.run(main())


def test_an_eager_batch_waits_for_admitted_requests_on_their_way_and_no_longer() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, eager=True, max_wait=0.5)
        batcher.start()
        # Alone, a request runs at once.
        with batcher.working(None) as arrival:
            started = time.monotonic()
            await batcher.submit(images(1.0), key=DEFAULT_KEY, deadline=started + 5, arrival=arrival)
        assert time.monotonic() - started < 0.25 and len(engine.batches) == 1
        # A second admitted request is still being read: the first waits for it, and both run in one batch.
        with batcher.working(None) as first, batcher.working(None) as second:
            waiting = asyncio.ensure_future(batcher.submit(images(2.0), key=DEFAULT_KEY,
                                                           deadline=time.monotonic() + 5, arrival=first))
            await asyncio.sleep(0.1)
            assert len(engine.batches) == 1, "the batch left without the request on its way"
            joining = asyncio.ensure_future(batcher.submit(images(3.0), key=DEFAULT_KEY,
                                                           deadline=time.monotonic() + 5, arrival=second))
            await asyncio.gather(waiting, joining)
        assert [float(item.pixels[0]) for item in engine.batches[1].items] == [2.0, 3.0]
        await asyncio.sleep(0.55)  # past the wait for the clients of that batch of two (the test below)
        # One that is refused or gives up before it is queued stops the wait at once.
        with batcher.working(None) as first:
            with batcher.working(None):
                waiting = asyncio.ensure_future(batcher.submit(images(4.0), key=DEFAULT_KEY,
                                                               deadline=time.monotonic() + 5, arrival=first))
                await asyncio.sleep(0.05)
                assert len(engine.batches) == 2
                left = time.monotonic()
            await waiting
        assert time.monotonic() - left < 0.25 and len(engine.batches[2].items) == 1
        # And it waits no longer than max_wait for one that does not come.
        with batcher.working(None) as first, batcher.working(None):
            started = time.monotonic()
            await batcher.submit(images(5.0), key=DEFAULT_KEY, deadline=started + 5, arrival=first)
            assert 0.45 < time.monotonic() - started < 1.0
        await batcher.stop()

    asyncio.run(main())


def test_a_request_larger_than_a_batch_is_split_and_answered_in_order() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine)
        batcher.start()
        results = await submit(batcher, images(*range(10)), "big")
        assert [r[4] for r in results] == list(range(10))
        assert [b.sizes for b in engine.batches] == [[4], [4], [2]]
        await batcher.stop()

    asyncio.run(main())


def test_a_full_queue_refuses_with_retry_after() -> None:
    async def main() -> None:
        engine = FakeEngine(delay=0.2)
        batcher = make_batcher(engine, queue_limit=4, max_wait=0.0)
        batcher.start()
        running = submit(batcher, images(1, 2, 3, 4), "running")
        await asyncio.sleep(0.05)  # the first batch is on the engine; the queue is empty again
        waiting = submit(batcher, images(5, 6, 7), "waiting")
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(images(8, 9), key=BatchKey(POLICY), deadline=time.monotonic() + 5)
        assert int(refused.value.headers()["Retry-After"]) >= 1
        assert len(await running) == 4 and len(await waiting) == 3
        await batcher.stop()

    asyncio.run(main())


def test_a_request_past_its_deadline_is_dropped_before_it_runs() -> None:
    async def main() -> None:
        engine = FakeEngine(delay=0.2)
        batcher = make_batcher(engine, max_wait=0.0)
        batcher.start()
        busy = submit(batcher, images(1, 2, 3, 4), "busy")
        await asyncio.sleep(0.05)
        late = submit(batcher, images(9), "late", timeout=0.05)
        on_time = submit(batcher, images(5), "on-time")
        with pytest.raises(DeadlineExceeded):
            await late
        await busy
        assert [r[4] for r in await on_time] == [5.0]
        ran = [float(item.pixels[0]) for batch in engine.batches for item in batch.items]
        assert ran == [1.0, 5.0], "the late image never ran"
        await batcher.stop()

    asyncio.run(main())


def test_a_failing_batch_fails_only_its_requests_and_the_loop_goes_on() -> None:
    async def main() -> None:
        engine = FakeEngine(fail_on=1)
        batcher = make_batcher(engine)
        batcher.start()
        with pytest.raises(InferenceFailed):
            await submit(batcher, images(1), "doomed")
        assert [r[4] for r in await submit(batcher, images(2), "fine")] == [2.0]
        await batcher.stop()

    asyncio.run(main())


def test_if_the_consumer_dies_pending_and_later_requests_fail_fast() -> None:
    calls = 0

    def broken_collect(queue, now, **options):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if queue:
            raise RuntimeError("bug in batch collection")
        return collect_batch(queue, now, **options)

    async def main() -> None:
        batcher = MicroBatcher(FakeEngine(), max_batch_size=4, max_wait=0.02, queue_limit=16,
                               collect=broken_collect)
        batcher.start()
        pending = submit(batcher, images(1), "pending", timeout=30)
        with pytest.raises(Unavailable, match="batching loop died"):
            await asyncio.wait_for(pending, timeout=2)  # fails at once, far before its deadline
        assert not batcher.alive and "RuntimeError" in (batcher.failure or "")
        with pytest.raises(Unavailable):
            await submit(batcher, images(2), "later")
        await batcher.stop()

    asyncio.run(main())


def test_draining_finishes_queued_work_and_refuses_new_requests() -> None:
    async def main() -> None:
        engine = FakeEngine(delay=0.05)
        batcher = make_batcher(engine, max_wait=0.05)
        batcher.start()
        queued = submit(batcher, images(1), "queued")
        await asyncio.sleep(0)
        await batcher.drain(timeout=5)
        assert [r[4] for r in await queued] == [1.0]
        with pytest.raises(Draining):
            await submit(batcher, images(2), "late")
        await batcher.stop()

    asyncio.run(main())


def test_results_are_routed_by_server_ids_across_tenants_and_groups() -> None:
    async def main() -> None:
        engine = FakeEngine()
        batcher = make_batcher(engine, share_tenants=True, max_batch_size=8)
        batcher.start()
        a = submit(batcher, images(1, 2), "a", key=BatchKey(POLICY, "a"))
        b = submit(batcher, images(3), "b", key=BatchKey(POLICY, "b"))
        a2 = submit(batcher, images(4), "a", key=BatchKey(POLICY, "a"))  # the same client id: no matter
        ra, rb, ra2 = await asyncio.gather(a, b, a2)
        assert len({item.id for item in engine.batches[0].items}) == 3
        assert engine.batches[0].sizes == [3, 1]
        assert [(r[1], r[3], r[4]) for r in ra + ra2] == [(0, 3, 1.0), (0, 3, 2.0), (0, 3, 4.0)]
        assert [(r[1], r[3], r[4]) for r in rb] == [(1, 1, 3.0)]
        await batcher.stop()

    asyncio.run(main())


def test_a_request_that_gives_up_frees_its_place_in_the_queue_at_once() -> None:
    async def main() -> None:
        engine = FakeEngine(delay=0.3)
        batcher = make_batcher(engine, max_wait=0.0)
        batcher.start()
        busy = submit(batcher, images(1, 2, 3, 4), "busy")
        await asyncio.sleep(0.05)
        impatient = submit(batcher, images(5, 6), "impatient", timeout=0.05)
        await asyncio.sleep(0.01)
        assert batcher.queued_images == 2
        with pytest.raises(DeadlineExceeded):
            await impatient
        assert batcher.queued_images == 0  # while the engine is still busy with the first batch
        await busy
        await batcher.stop()

    asyncio.run(main())
