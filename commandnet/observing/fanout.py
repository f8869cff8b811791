"""Calling observers from the engine: each hook on each observer that overrides it, errors
only logged (an observer never breaks a step). A mixin of :class:`~commandnet.engine.Engine`."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..observer import DeliveryInfo, Observer, StatusInfo, TransitionInfo

if TYPE_CHECKING:
    from ..bus import Delivery
    from ..persistence import Persistence
    from ..records import AgentRecord

log = logging.getLogger("commandnet")


class Notifications:
    """The engine's side of the :class:`~commandnet.observer.Observer` hooks."""

    if TYPE_CHECKING:
        observers: list[Observer]
        persistence: Persistence
        _final: asyncio.Condition

    async def _notify_transition(self, info: TransitionInfo, status: StatusInfo) -> None:
        await self._emit("on_transition", info.agent_id, info.from_node, info.to_node,
                         info.duration * 1000)
        await self._emit("on_step", info)
        await self._notify_status(status)
        if info.to_node is None:
            await self._wake()

    async def _notify_delivery(self, kind: str, delivery: Delivery, outcome: str) -> None:
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

    async def _emit(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on each observer that overrides it (skipping the no-op defaults saves
        a coroutine per observer and hook on every step); observer errors are only logged."""
        for obs in self.observers:
            if getattr(type(obs), hook) is not getattr(Observer, hook):
                await _safely(getattr(obs, hook)(*args))

    async def _wake(self) -> None:
        async with self._final:
            self._final.notify_all()

    async def _close_observers(self) -> None:
        for obs in self.observers:
            await _safely(obs.close())


async def _safely(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("observer failed (ignored)")
