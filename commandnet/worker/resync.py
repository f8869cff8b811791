"""Status resync: the store is the truth, status mirrors (the NATS KV bucket) follow it.

A mirror's write is buffered after the commit, so a worker killed between its last commit and the
next flush leaves the mirror one status behind: an Agent resource would show Running for ever.
The pool's sweeper (one worker of the pool at a time, :meth:`Persistence.claim_sweep`) therefore
replays the stored status of every agent that changed since the last resync and has been quiet
for ``quiet`` seconds; the resync mark is kept in the store, so a worker that starts after the
whole pool was down catches up from where the last one stopped. Mirrors never move a key back
to an earlier step, so a replay can only repair, never regress. Each agent is replayed about once
per quiet spell: a busy agent is not replayed at all until it rests or finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ..observer import Observer, StatusInfo
from ..persistence import Persistence
from ..records import AgentRecord

log = logging.getLogger("commandnet.resync")

PAGE = 500
FIRST_WINDOW = 3600.0  # a pool never resynced before: replay the last hour
IN_FLIGHT_MARGIN = 1.0  # a commit's time is its start: one that was in flight lands behind us


class StatusResync:
    """Replays stored statuses into ``mirrors`` while this owner holds the pool's sweep turn."""

    def __init__(self, store: Persistence, pool: str, owner: str, mirrors: Sequence[Observer],
                 *, interval: float = 5.0, quiet: float = 5.0) -> None:
        self.store, self.pool, self.owner = store, pool, owner
        self.mirrors = list(mirrors)
        self.interval = interval
        self.quiet = quiet
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int | None:
        """One pass; the number of statuses replayed, or None when another worker sweeps."""
        claim = await self.store.claim_sweep(self.pool, self.owner, self.interval * 3 + 1)
        if claim is None:
            return None
        until = claim.now - self.quiet
        if claim.resynced_until is None:
            after = (until - FIRST_WINDOW, "")
        else:
            after = (claim.resynced_until - IN_FLIGHT_MARGIN, "")
        replayed = 0
        while True:
            page = await self.store.changed_agents(self.pool, after, until, PAGE)
            for rec in page:
                await self._replay(rec)
            replayed += len(page)
            # Mirrors buffer their writes: the mark may only pass statuses they have written,
            # or a worker killed before its next flush loses them for good (nothing replays
            # them). Writing each page before reading the next also bounds the buffers to one
            # page: a pass over 100,000 agents waiting in the stream (all quiet) would
            # otherwise hold every one of their statuses in memory at once.
            if page and not await self._flush():
                log.warning("status resync of pool %r: a mirror did not write its statuses; "
                            "the next pass replays them again", self.pool)
                return replayed
            if len(page) < PAGE:
                break
            after = (page[-1].updated_at, page[-1].agent_id)
        await self.store.mark_resynced(self.pool, max(until, claim.resynced_until or until))
        return replayed

    async def _flush(self) -> bool:
        """Write what the mirrors buffered now; False when one of them failed to."""
        written = True
        for mirror in self.mirrors:
            flush = getattr(mirror, "flush", None)
            if flush is None:
                continue
            try:
                if await flush() is False:
                    written = False
            except Exception:
                log.exception("status mirror failed to flush (the next pass replays again)")
                written = False
        return written

    async def _replay(self, rec: AgentRecord) -> None:
        info = StatusInfo(rec.agent_id, rec.status, rec.node, rec.step, rec.error)
        for mirror in self.mirrors:
            try:
                await mirror.on_status(info)
            except Exception:
                log.exception("status mirror failed to take agent %r (ignored)", rec.agent_id)

    def start(self) -> None:
        """Run passes every ``interval`` seconds in the background."""
        if self._task is None and self.mirrors:
            self._task = asyncio.create_task(self._loop(), name="commandnet-resync")

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:
                log.warning("status resync of pool %r failed, retrying in %.1fs: %s: %s",
                            self.pool, self.interval, type(exc).__name__, exc)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        """Stop the background passes (the mirrors flush themselves at ``close``)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
