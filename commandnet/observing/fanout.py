"""Calling observers from the engine: each hook on each observer that overrides it, errors
only logged (an observer never breaks a step). A mixin of :class:`~commandnet.engine.Engine`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..observer import DeliveryInfo, Observer, StatusInfo, TransitionInfo
from ..records import AgentStatus

if TYPE_CHECKING:
    from ..bus import Delivery
    from ..persistence import Persistence
    from ..records import AgentRecord

log = logging.getLogger("commandnet")


class Notifications:
    """The engine's side of the :class:`~commandnet.observer.Observer` hooks."""

    if TYPE_CHECKING:
        observers: list[Observer]
        _hooked: list[Observer]
        _hooked_by: dict[str, list[Callable[..., Awaitable[None]]]]
        persistence: Persistence
        _final: asyncio.Condition

    async def _notify_transition(self, rec: AgentRecord, to_node: str | None, duration: float,
                                 attempt: int) -> None:
        """The step of ``rec`` was committed, moving the agent to ``to_node``."""
        status = AgentStatus.RUNNING if to_node else AgentStatus.SUCCEEDED
        await self._emit("on_transition", rec.agent_id, rec.node, to_node, duration * 1000)
        if self._hooks("on_step"):
            await self._emit("on_step", TransitionInfo(rec.agent_id, rec.step + 1, rec.node,
                                                       to_node, status, duration, attempt))
        if self._hooks("on_status"):
            await self._notify_status(StatusInfo(rec.agent_id, status, to_node or rec.node,
                                                 rec.step + 1, None))
        if to_node is None:
            await self._wake()

    async def _notify_delivery(self, kind: str, delivery: Delivery, outcome: str) -> None:
        if self._hooks("on_delivery"):
            await self._emit("on_delivery", DeliveryInfo(kind, delivery.deliveries, outcome))

    async def _notify_status(self, info: StatusInfo) -> None:
        await self._emit("on_status", info)

    async def _notify_parent(self, ended: AgentRecord) -> None:
        """A branch failed or was cancelled: under fail fast the same transaction failed its
        parent, which no step of this worker reports. (Siblings cancelled with it are left to
        the status resync: a fan-out may have thousands.)"""
        if ended.parent_id is None:
            return
        parent = await self.persistence.get_agent(ended.parent_id)
        if parent is not None and parent.status.is_final:
            await self._notify_status(StatusInfo(parent.agent_id, parent.status, parent.node,
                                                 parent.step, parent.error))
            await self._wake()

    def _hooks(self, hook: str) -> list[Callable[..., Awaitable[None]]]:
        """The observers' overrides of ``hook`` (the no-op defaults are skipped: that saves a
        coroutine per observer and hook on every step), cached until ``observers`` changes."""
        if self.__dict__.get("_hooked") != self.observers:
            self._hooked, self._hooked_by = list(self.observers), {}
        found = self._hooked_by.get(hook)
        if found is None:
            found = self._hooked_by[hook] = [
                getattr(obs, hook) for obs in self.observers
                if getattr(type(obs), hook) is not getattr(Observer, hook)]
        return found

    async def _emit(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on each observer that overrides it; observer errors are only logged."""
        for call in self._hooks(hook):
            try:
                await call(*args)
            except Exception:
                log.exception("observer failed (ignored)")

    async def _wake(self) -> None:
        async with self._final:
            self._final.notify_all()

    async def _close_observers(self) -> None:
        for obs in self.observers:
            try:
                await obs.close()
            except Exception:
                log.exception("observer failed (ignored)")
