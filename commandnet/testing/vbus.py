"""A deterministic in-memory bus on virtual time, driven one delivery at a time by a test."""

from __future__ import annotations

import heapq
import itertools

from typing_extensions import override

from ..bus import Delivery, EventBus, Handler
from ..messages import AnyMessage, encode


class VirtualClock:
    """A clock that only moves when told; pass it to a store as ``clock=``."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        """The current virtual time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += max(seconds, 0.0)


class _VDelivery(Delivery):
    def __init__(self, bus: VirtualTimeBus, data: bytes, deliveries: int) -> None:
        self.bus, self.data, self.deliveries = bus, data, deliveries
        self.settled = False

    def _settle(self) -> bool:
        fresh = not self.settled
        self.settled = True
        self.bus.unsettled.discard(self)
        return fresh

    @override
    async def ack(self) -> None:
        self._settle()

    @override
    async def nack(self, delay: float) -> None:
        if self._settle():
            self.bus.put(self.data, self.deliveries + 1, delay)

    @override
    async def in_progress(self) -> None:
        """Nothing to postpone: unsettled deliveries wait for :meth:`VirtualTimeBus.redeliver`."""

    @override
    async def dead_letter(self, reason: str) -> None:
        if self._settle():
            self.bus.dead_letters.append((self.data, reason))


class VirtualTimeBus(EventBus):
    """Messages ordered by due time; nack delays move a virtual clock instead of sleeping."""

    def __init__(self, clock: VirtualClock, dedup: bool = True) -> None:
        self.clock = clock
        self.dedup = dedup
        self.dead_letters: list[tuple[bytes, str]] = []
        self.unsettled: set[_VDelivery] = set()
        self._heap: list[tuple[float, int, bytes, int]] = []
        self._seq = itertools.count()
        self._seen: set[str] = set()

    @override
    async def publish(self, message: AnyMessage) -> None:
        if self.dedup and message.dedup_id in self._seen:
            return
        self._seen.add(message.dedup_id)
        self.put(encode(message), 1)

    def put(self, data: bytes, deliveries: int, delay: float = 0.0) -> None:
        """Queue raw bytes, due after ``delay`` virtual seconds."""
        heapq.heappush(self._heap, (self.clock() + delay, next(self._seq), data, deliveries))

    def next_delivery(self) -> Delivery | None:
        """The earliest message (advancing the clock to its due time), or None when empty."""
        if not self._heap:
            return None
        due, _, data, deliveries = heapq.heappop(self._heap)
        self.clock.advance(due - self.clock())
        delivery = _VDelivery(self, data, deliveries)
        self.unsettled.add(delivery)
        return delivery

    def redeliver(self) -> int:
        """Requeue every unsettled delivery, as a broker does when its ack wait runs out."""
        pending = list(self.unsettled)
        for delivery in pending:
            delivery._settle()
            self.put(delivery.data, delivery.deliveries + 1)
        return len(pending)

    def __len__(self) -> int:
        return len(self._heap)

    @override
    async def subscribe(self, handler: Handler) -> None:
        raise NotImplementedError("VirtualTimeBus is driven by FaultHarness, not subscribed to")

    @override
    async def unsubscribe(self) -> None:
        """Nothing to stop."""
