"""What a store does for the status resync (:mod:`commandnet.worker.resync`): part of
:class:`~commandnet.persistence.Persistence`, declared here, next to its user."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..records import AgentRecord


class ResyncStore(ABC):
    """Pages of changed agents, and how far the pool's resync has come."""

    @abstractmethod
    async def mark_resynced(self, pool: str, until: float) -> None:
        """Record that statuses changed up to ``until`` (store clock) have been resynced."""

    @abstractmethod
    async def changed_agents(
        self, pool: str, after: tuple[float, str], until: float, limit: int
    ) -> list[AgentRecord]:
        """Agents of ``pool`` whose ``(updated_at, agent_id)`` is past ``after`` and whose
        ``updated_at`` is at most ``until``, in that order (a page of the status resync)."""
