"""Admission control and fair order for the batcher's queue.

Work that cannot be answered in time is refused at the door (429 with ``Retry-After``) instead of being queued
to be dropped later: under overload the service keeps answering what it can answer in time, and tells the rest
when to come back. A request is refused when

- its tenant was admitted ``tenant_rate`` requests a second already (a token bucket per tenant; off unless set);
- ``max_active`` requests are being answered already (decoding, queued or running): every request in the
  service takes turns on one event loop, so more of them make each slower; or its tenant already has its share
  of those (``tenant_share``, while another tenant is active; below it, a tenant may exceed ``max_active``
  up to twice it);
- its tenant already holds its share of the queue (``tenant_share`` of ``limit`` images, while another tenant
  is active; a tenant with nothing queued may always queue one request);
- the queue holds ``limit`` images;
- the expected wait for its answer (the images ahead of it, at the engine's recent speed, plus what is left of
  the running batch) ends after its deadline.

Queued work is kept in fair order between tenants, start-time fair queueing counted in images (Goyal et al.
1996): each tenant's work is tagged in sequence from the virtual time of the work last sent to the engine, so a
tenant that sends ten times more than the others waits behind its own backlog, not theirs. With one tenant (or
none: requests not told apart) the order is first come, first served.

Nothing here knows about HTTP or about models.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from .errors import Overloaded, QueueFull, TenantQueueFull, TenantRateExceeded

ACTIVE_SECONDS = 10.0  # a tenant admitted this recently still counts as active for the shares


class Rate:
    """How long the engine takes lately: a batch (moving average), and an image (seconds over images of recent
    batches, so that the full batches of a busy engine weigh more than the lone images of an idle one)."""

    def __init__(self, smoothing: float = 0.2) -> None:
        self.smoothing = smoothing
        self.batch_seconds = 0.0  # 0 until a batch ran
        self.batch_spread = 0.0  # moving average of how far a batch's time is from batch_seconds
        self._seconds = self._images = 0.0

    @property
    def slow_batch_seconds(self) -> float:
        """What a slower batch than most takes: the time work must have left to be worth starting (a batch that
        ends after a request's deadline was run for nothing)."""
        return self.batch_seconds + 2 * self.batch_spread

    @property
    def image_seconds(self) -> float:
        return self._seconds / self._images if self._images else 0.0

    @image_seconds.setter
    def image_seconds(self, value: float) -> None:
        self._seconds, self._images = value, 1.0

    def observe(self, images: int, seconds: float) -> None:
        keep = 1 - self.smoothing if self.batch_seconds else 0.0
        self.batch_spread = keep * self.batch_spread + (1 - keep) * abs(seconds - self.batch_seconds) * bool(keep)
        self.batch_seconds = keep * self.batch_seconds + (1 - keep) * seconds
        self._seconds = keep * self._seconds + seconds
        self._images = keep * self._images + max(1, images)


class TenantQuota:
    """Requests a second each tenant is admitted at most: a token bucket per tenant, ``rate`` tokens a second,
    holding a tenth of a second's worth (at least one), so that a tenant over its quota still gets its quota's
    worth of answers, spread as they come. :meth:`check` refuses when a tenant's bucket is empty; a request
    admitted takes its token when it is counted as being answered (:meth:`take`)."""

    def __init__(self, rate: float, clock: Callable[[], float], burst_seconds: float = 0.1) -> None:
        self.rate = rate
        self.burst = max(1.0, rate * burst_seconds)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when counted)
        self._prune_above = 4096

    def _tokens(self, tenant: str, now: float) -> float:
        tokens, at = self._buckets.get(tenant, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def check(self, tenant: str) -> None:
        tokens = self._tokens(tenant, self._clock())
        if tokens < 1.0 - 1e-9:  # (a token refilled in float arithmetic may fall short by a rounding error)
            raise TenantRateExceeded(f"this tenant is over its quota of {self.rate:g} requests a second; retry "
                                     "after the time in Retry-After", retry_after=(1.0 - tokens) / self.rate)

    def take(self, tenant: str) -> None:
        now = self._clock()
        self._buckets[tenant] = (self._tokens(tenant, now) - 1.0, now)
        if len(self._buckets) > self._prune_above:  # tenants named by a header: forget full buckets, now and
            # then (after the count doubled), so that many tenants cost no more than a few
            self._buckets = {name: entry for name, entry in self._buckets.items()
                             if self._tokens(name, now) < self.burst}
            self._prune_above = max(4096, 2 * len(self._buckets))


class _Keyed(Protocol):
    @property
    def tenant(self) -> str | None: ...


class Fair(Protocol):
    """What the fair queue needs of an item."""

    @property
    def key(self) -> _Keyed: ...
    @property
    def size(self) -> int: ...
    order: float  # start tag in virtual time (images), set by the queue


F = TypeVar("F", bound=Fair)


class FairQueue(Generic[F]):
    """Queued items in fair order (``items``), the images each tenant holds, and the door to the queue."""

    def __init__(self, *, limit: int, tenant_share: float = 1.0, max_active: int | None = None,
                 tenant_rate: float | None = None, batch_size: int = 1, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.quota = None if tenant_rate is None else TenantQuota(tenant_rate, clock)
        self.batch_size = batch_size  # images that run in one batch at most
        self.tenant_share = tenant_share
        self.max_active = max_active
        self.active: Counter[str | None] = Counter()  # tenant -> requests being answered
        self._clock = clock
        self.items: list[F] = []
        self._queued: set[int] = set()  # id() of each item in items
        self.images = 0
        self._virtual = 0.0  # the start tag of the work last sent to the engine
        self._finish: dict[str | None, float] = {}  # tenant -> finish tag of its latest queued work
        self._held: dict[str | None, int] = {}  # tenant -> images queued
        self._seen: dict[str | None, float] = {}  # tenant -> when it last queued work

    def held(self, tenant: str | None) -> int:
        """Images ``tenant`` has queued."""
        return self._held.get(tenant, 0)

    def tenant_limit(self, tenant: str | None, total: int | None = None) -> int:
        """How much of ``total`` (the queue's images by default) ``tenant`` may hold now: all of it while no other
        tenant is active, else its share."""
        total = self.limit if total is None else total
        now = self._clock()
        others = any(held for other, held in self._held.items() if other != tenant) or any(
            now - seen < ACTIVE_SECONDS for other, seen in self._seen.items() if other != tenant)
        return max(1, math.floor(self.tenant_share * total)) if others else total

    @contextlib.contextmanager
    def working(self, tenant: str | None) -> Iterator[None]:
        """Count a request of ``tenant`` as being answered, for ``max_active``."""
        self.active[tenant] += 1
        if self.quota is not None and tenant is not None:
            self.quota.take(tenant)
        try:
            yield
        finally:
            self.active[tenant] -= 1
            if not self.active[tenant]:
                del self.active[tenant]

    def images_ahead(self, tenant: str | None) -> int:
        """Images that would run before new images of ``tenant``."""
        start = max(self._virtual, self._finish.get(tenant, 0.0))
        items = self.items  # in order of their tags: those ahead are a prefix
        if not items or items[-1].order <= start:
            return self.images  # all of it (one tenant, or the one with the latest tags): asked on every
            # admission, and under overload the queue is long
        cut = bisect.bisect_right(items, start, key=lambda queued: queued.order)
        if cut <= len(items) // 2:
            return sum(item.size for item in items[:cut])
        return self.images - sum(item.size for item in items[cut:])

    def admit(self, count: int, tenant: str | None, *, deadline: float, rate: Rate, running_left: float,
              arriving: bool = True) -> None:
        """Raise the 429 that refuses ``count`` new images of ``tenant``, if they must be refused. ``arriving``:
        the request is not yet counted among those being answered."""
        if arriving and self.quota is not None and tenant is not None:
            self.quota.check(tenant)
        if arriving and self.max_active is not None:
            total, mine = sum(self.active.values()), self.active.get(tenant, 0)
            allowed = self.tenant_limit(tenant, self.max_active)
            if mine >= allowed and allowed < self.max_active:
                raise TenantQueueFull(f"this tenant has {mine} requests being answered, its share while other "
                                      "tenants are active; retry after the time in Retry-After",
                                      retry_after=rate.batch_seconds)
            # Below its share, a tenant may go beyond the bound (up to twice it): a tenant that took every place
            # before another arrived cannot keep that one out.
            if total >= self.max_active and (mine >= allowed or total >= 2 * self.max_active):
                raise Overloaded(f"{total} requests are being answered, the most this service takes on at once; "
                                 "retry after the time in Retry-After", retry_after=self.drain_seconds(rate, 0.0))
        held, allowed = self.held(tenant), self.tenant_limit(tenant)
        if held and held + count > allowed and allowed < self.limit:
            excess = held + count - allowed
            raise TenantQueueFull(
                f"this tenant has {held} images waiting, its share of the queue is {allowed} while other tenants "
                "are active; retry after the time in Retry-After", retry_after=excess * rate.image_seconds)
        if self.images + count > self.limit:
            raise QueueFull(f"the queue is full ({self.images} of {self.limit} images waiting); retry after the "
                            "time in Retry-After", retry_after=self.drain_seconds(rate, running_left))
        now = self._clock()
        self._seen[tenant] = now  # active from its admission on, while its images are still being decoded
        ahead = self.images_ahead(tenant)
        if rate.image_seconds == 0 or ahead + count <= self.batch_size:
            return  # no batch ran yet, or it joins the next batch (whose time the batcher's margin checks)
        # Its answer: after the running batch and the images ahead, its own batch (the batcher drops work with
        # less time left than a batch takes, so it must start at least that long before its deadline).
        wait = running_left + ahead * rate.image_seconds + rate.batch_seconds
        if now + wait > deadline:
            raise Overloaded(
                f"the expected time to an answer ({wait:.3f} s) exceeds the {max(0.0, deadline - now):.3f} s left "
                "to this request's deadline; retry after the time in Retry-After, or allow a longer deadline",
                retry_after=now + wait - deadline)

    def drain_seconds(self, rate: Rate, running_left: float) -> float:
        """Seconds until the queued images have likely run."""
        return running_left + self.images * rate.image_seconds + rate.batch_seconds

    def push(self, items: Sequence[F]) -> None:
        """Queue ``items`` (one request's chunks, in order) behind their tenant's earlier work."""
        now = self._clock()
        for item in items:
            tenant = item.key.tenant
            item.order = max(self._virtual, self._finish.get(tenant, 0.0))
            self._finish[tenant] = item.order + item.size
            self._held[tenant] = self.held(tenant) + item.size
            self._seen[tenant] = now
            # After every item of equal or smaller tag: equal tags keep their arrival order.
            bisect.insort_right(self.items, item, key=lambda queued: queued.order)
            self._queued.add(id(item))
            self.images += item.size

    def remove(self, items: Iterable[F]) -> list[F]:
        """Take ``items`` out of the queue; those that were in it."""
        leaving = {id(item) for item in items} & self._queued
        if not leaving:  # (every request asks once it is answered, when its items left with their batch)
            return []
        removed = [item for item in self.items if id(item) in leaving]
        self.items = [item for item in self.items if id(item) not in leaving]
        self._queued -= leaving
        for item in removed:
            tenant = item.key.tenant
            self.images -= item.size
            self._held[tenant] -= item.size
            if not self._held[tenant]:
                del self._held[tenant]
        return removed

    def started(self, items: Sequence[F]) -> None:
        """``items`` went to the engine: virtual time moves to the latest of their tags."""
        self._virtual = max([self._virtual, *(item.order for item in items)])
        # Forget what no longer matters, so that tenants named by a header cannot grow these without bound: tags
        # virtual time has passed, and past a bound the tags of tenants with nothing queued (such a tenant comes
        # back at the virtual time, a little ahead of where its tag would have put it).
        self._finish = {tenant: tag for tenant, tag in self._finish.items() if tag > self._virtual}
        if len(self._finish) > 4 * self.limit:
            self._finish = {tenant: tag for tenant, tag in self._finish.items() if tenant in self._held}
        now = self._clock()
        self._seen = {tenant: seen for tenant, seen in self._seen.items() if now - seen < ACTIVE_SECONDS}

    def clear(self) -> list[F]:
        """Empty the queue; what it held."""
        return self.remove(list(self.items))
