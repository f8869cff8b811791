"""Sticky execution: the worker that commits a step keeps the lease of the next one.

With local handoff (the bus hands the next step's event to this worker instead of publishing
it) leasing that step again would be a round trip to the store whose answer is known: this
worker, attempt 1. So the commit itself keeps the lease (``Commit.keep_lease``) and the
handed-over step runs without a lease statement: one statement per transition instead of two.

Nothing else changes. The commit still writes the next step's outbox row, the recovery path
should this worker die: its outbox rescue re-publishes the row, and another worker takes the
step once the kept lease has expired (``lease_seconds``, as for a step that was running),
the death counted as a shared run's (no attempt used). A kept lease that could not be used (the
bus published the event after all, the worker is stopping, the step waited too long for a free
slot) is released at once, so no other worker waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING

from ..messages import StepEvent, decode
from ..records import AgentRecord, Commit, Lease, LeaseState

if TYPE_CHECKING:
    from ..bus import Delivery, EventBus
    from ..persistence import Persistence


def kept_lease(commit: Commit) -> float | None:
    """``commit.keep_lease`` where it applies (stores call this): a move to a next step that
    does not park; None otherwise."""
    keep = commit.keep_lease if commit.plain else None
    return None if keep is None else float(keep)


class KeptLeases:
    """The engine's part of sticky execution (a mixin of :class:`~commandnet.engine.Engine`)."""

    if TYPE_CHECKING:
        persistence: Persistence
        bus: EventBus
        owner: str
        lease_seconds: float
        _slots: asyncio.Semaphore

    @cached_property
    def _kept(self) -> dict[tuple[str, int], tuple[AgentRecord, float]]:
        """(agent, step) -> the record as the kept lease left it, and when (monotonic)."""
        return {}

    def _keep_next(self) -> float | None:
        """The ``keep_lease`` for a commit now: the lease length if the bus would hand the
        next step to this worker (the commit applies it to plain moves only)."""
        return self.lease_seconds if self.bus.hands_over() else None

    async def _kept_after(self, rec: AgentRecord, commit: Commit) -> None:
        """After ``commit`` (saved) kept the next step's lease, right before that step's event
        is published: remember the lease for the handed-over delivery if the bus will hand
        the event over, else release it now. Released after the publish instead, a worker
        could receive the message first, find the lease held and put it off for up to
        ``lease_seconds``. The caller publishes with no await after this returns:
        ``hands_over()`` is what ``publish`` checks first, synchronously (and an event handed
        over after a release here is leased as usual)."""
        if kept_lease(commit) is None:
            return
        if not self.bus.hands_over():
            await self.persistence.release_lease(rec.agent_id, rec.step + 1, self.owner)
            return
        self._kept[(rec.agent_id, rec.step + 1)] = (replace(
            rec, node=commit.to_node or rec.node, step=rec.step + 1, context=commit.context,
            payload=commit.payload, attempts=1, crashes=0, error=None,
            lease_owner=self.owner, graph_version=commit.graph_version or rec.graph_version,
        ), time.monotonic())

    async def _kept_lease(self, event: StepEvent) -> Lease | None:
        """The kept lease of ``event``'s step, if this worker holds one that is fresh enough
        for the heartbeat (which extends every ``lease_seconds / 3``) to keep it alive; a
        stale one is released and None returned (the caller leases as usual)."""
        kept = self._kept.pop((event.agent_id, event.step), None)
        if kept is None:
            return None
        if time.monotonic() - kept[1] > self.lease_seconds / 2:
            await self.persistence.release_lease(event.agent_id, event.step, self.owner)
            return None
        return Lease(LeaseState.GRANTED, kept[0])

    async def _free_slot(self, delivery: Delivery) -> None:
        """Wait for a free slot for ``delivery``; if this is cancelled (a handed-over step
        given back at stop), release the step's kept lease first."""
        try:
            await self._slots.acquire()
        except asyncio.CancelledError:
            await self._drop_kept(delivery)
            raise

    async def _release_kept(self, agent_id: str, step: int) -> None:
        """Give up a kept lease that will not be used here."""
        if self._kept.pop((agent_id, step), None) is not None:
            await self.persistence.release_lease(agent_id, step, self.owner)

    async def _drop_kept(self, delivery: Delivery) -> None:
        """A delivery given back before its step ran (stopping): release its kept lease
        first, so that the worker the bus gives it to need not wait for the lease to expire.
        Never raises: if the store cannot be reached, the lease expires by itself."""
        with contextlib.suppress(Exception):  # a malformed message has no kept lease
            message = decode(delivery.data)
            if isinstance(message, StepEvent):
                await self._release_kept(message.agent_id, message.step)
