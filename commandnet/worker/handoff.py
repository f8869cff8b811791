"""Recovery of steps handed over locally (``local_handoff``) whose worker died: every worker.

A step the bus handed to its own worker has no stream message; its durable outbox row (written
by the commit of the step before) is its only record until its own commit deletes it. The
pool's sweeper re-publishes old outbox rows too, but one worker at a time, and its turn
outlives a killed holder by ``3 * sweep_interval + 1`` seconds: when workers die one after
another, the sweeping turn is often held by a dead one, and the steps of the dead would wait
for it. So each worker also re-publishes this pool's outbox rows older than ``outbox_grace``.
Two workers publishing one row is harmless: its de-dup id (``agent:step``) is stable, so
JetStream stores it once, and the lease fences whatever runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..bus import EventBus
from ..messages import StepEvent
from ..persistence import Persistence

log = logging.getLogger("commandnet.worker")

BATCH = 1000


class OutboxRescue:
    """Every ``interval`` s, publish this pool's outbox rows older than ``grace`` s, then
    delete them (the same as the sweeper's outbox pass, without waiting for its turn)."""

    def __init__(self, store: Persistence, bus: EventBus, *, interval: float,
                 grace: float) -> None:
        self.store, self.bus = store, bus
        self.interval, self.grace = interval, grace
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """One pass; how many events were re-published."""
        entries = await self.store.pending_outbox(self.grace, BATCH, self.bus.pool)
        for entry in entries:
            await self.bus.publish(StepEvent(agent_id=entry.agent_id, step=entry.step))
        if entries:
            await self.store.clear_outbox(entries)
            log.info("re-published %d step(s) of pool %r from the outbox", len(entries),
                     self.bus.pool)
        return len(entries)

    def start(self) -> None:
        """Start the background loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="commandnet-outbox-rescue")

    async def stop(self) -> None:
        """Stop the background loop."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("outbox rescue of pool %r failed; retrying in %.1fs: %s: %s",
                            self.bus.pool, self.interval, type(exc).__name__, exc)
