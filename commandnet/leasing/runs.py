"""The nodes running on a worker: the heartbeat keeps their leases alive, and a node is stopped
when its timeout runs out or its lease is lost.

One timer serves all running nodes (armed at the earliest deadline, re-armed from the running
set when it fires) instead of an ``asyncio.timeout`` per step: that would create and cancel a
timer handle for every transition, about a tenth of a step's cost in one process. A node is
stopped as ``asyncio.timeout`` stops it: its task is cancelled, and the cancellation it did
not ask for is turned into :class:`NodeTimeoutError` or :class:`LeaseLostError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ..errors import LeaseLostError, NodeTimeoutError

if TYPE_CHECKING:
    from ..bus import Delivery
    from ..persistence import Persistence
    from ..records import AgentRecord

log = logging.getLogger("commandnet")


class Run:
    """One node execution on this worker."""

    __slots__ = ("agent_id", "cancelling", "deadline", "delivery", "step", "stopped", "task")

    def __init__(self, agent_id: str, step: int, delivery: Delivery, deadline: float | None,
                 task: asyncio.Task[Any]) -> None:
        self.agent_id, self.step, self.delivery = agent_id, step, delivery
        self.deadline, self.task, self.cancelling = deadline, task, task.cancelling()
        self.stopped: str | None = None  # why this worker cancelled it: "timeout", "lost"


class RunningNodes:
    """The engine's running nodes (a mixin of :class:`~commandnet.engine.Engine`)."""

    if TYPE_CHECKING:
        persistence: Persistence
        owner: str
        lease_seconds: float

    _timer: asyncio.TimerHandle | None = None

    @cached_property
    def _running(self) -> set[Run]:
        return set()

    async def _run_node(self, rec: AgentRecord, delivery: Delivery, call: Awaitable[Any],
                        timeout: float | None) -> Any:
        """Await ``call`` (the leased node's ``run``) within ``timeout`` and the lease."""
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        run = Run(rec.agent_id, rec.step, delivery,
                  None if timeout is None else loop.time() + timeout, task)
        self._running.add(run)
        if run.deadline is not None and (self._timer is None
                                         or run.deadline < self._timer.when()):
            self._arm(run.deadline)
        try:
            return await call
        except asyncio.CancelledError:
            if run.stopped is None:
                raise
            why, run.stopped = run.stopped, "settled"
            if task.uncancel() > run.cancelling:
                raise  # cancelled by someone else as well (the worker is stopping)
            if why == "lost":
                raise LeaseLostError(f"agent {rec.agent_id!r} step {rec.step}: lease lost "
                                     "(cancelled, or taken over after a stall)") from None
            raise NodeTimeoutError(f"node {rec.node!r} timed out after {timeout}s") from None
        finally:
            self._running.discard(run)
            if run.stopped in ("timeout", "lost"):  # the node swallowed our cancellation
                task.uncancel()

    def _disarm(self) -> None:
        """Forget the timer (the engine stopped: a later start may be on another loop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_at(when, self._deadlines_due)

    def _deadlines_due(self) -> None:
        """Stop the nodes whose deadline has passed; arm the timer for the next deadline."""
        self._timer = None
        now = asyncio.get_running_loop().time()
        for run in self._running:
            if run.stopped is None and run.deadline is not None and run.deadline <= now:
                self._stop(run, "timeout")
        later = [run.deadline for run in self._running
                 if run.stopped is None and run.deadline is not None]
        if later:
            self._arm(min(later))

    @staticmethod
    def _stop(run: Run, why: str) -> None:
        run.stopped = why
        run.task.cancel()

    async def _heartbeat_loop(self) -> None:
        """Keep the leases and messages of running nodes alive; stop nodes whose lease is lost."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            for run in list(self._running):
                try:
                    await run.delivery.in_progress()
                    kept = await self.persistence.extend_lease(run.agent_id, run.step,
                                                               self.owner, self.lease_seconds)
                except Exception:
                    kept = True
                    if run in self._running:  # else it committed meanwhile: nothing to keep
                        log.exception("agent %r: lease extension failed", run.agent_id)
                if not kept and run in self._running and run.stopped is None:
                    log.warning("agent %r step %d: lease lost, stopping its node",
                                run.agent_id, run.step)
                    self._stop(run, "lost")
