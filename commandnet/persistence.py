"""The store interface. The store, not the bus, is the truth about every agent.

Every method that changes a running agent is fenced: it applies only while ``owner`` holds the
lease on exactly ``step`` of a running agent, so a stale worker, a duplicate event or a
cancellation can never double or resurrect a transition. Implementations must make each method
one atomic transaction. Times are epoch seconds from the store's own clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from .records import (
    AgentRecord,
    Commit,
    Failure,
    HistoryRecord,
    Lease,
    NewAgent,
    OutboxEntry,
)


class Persistence(ABC):
    """Durable agent state with step-fenced leases and a transactional outbox."""

    async def setup(self) -> None:
        """Create or migrate the schema; idempotent. Called by the engine at start."""

    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def create_agent(self, agent: NewAgent) -> bool:
        """Insert the agent at step 0 and its first step event in the outbox, atomically.

        Returns True when created, False when the same request already exists (idempotent).
        Raises :class:`~commandnet.errors.TriggerConflictError` when the id exists with another
        start node or initial context. A ``NewAgent`` whose status is final writes no event.
        """

    @abstractmethod
    async def load_and_lock_agent(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> Lease:
        """Lease ``step`` of a running agent if no live lease or retry delay stands in the way."""

    @abstractmethod
    async def extend_lease(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> bool:
        """Keep a lease alive during a long node; False when it was lost (cancelled, taken)."""

    @abstractmethod
    async def save_state(self, commit: Commit) -> bool:
        """Commit a transition, its history row and (if not final) its outbox event.

        Returns False, changing nothing, when the fence fails.
        """

    @abstractmethod
    async def record_failure(self, failure: Failure) -> bool:
        """Store a failed attempt (or fail the agent when final); False when the fence fails."""

    @abstractmethod
    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        """Give a lease back without a transition (worker draining)."""

    @abstractmethod
    async def cancel_agent(self, agent_id: str, reason: str) -> bool:
        """Mark a running agent cancelled; False when it is missing or already final."""

    @abstractmethod
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        """The agent's row, or None."""

    @abstractmethod
    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        """Committed transitions of an agent, in step order."""

    @abstractmethod
    async def pending_outbox(self, older_than: float, limit: int) -> list[OutboxEntry]:
        """Outbox events written more than ``older_than`` seconds ago (a publish was lost)."""

    @abstractmethod
    async def clear_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        """Forget outbox events that have been published."""

    @abstractmethod
    async def stalled_agents(self, older_than: float, limit: int) -> list[OutboxEntry]:
        """Running agents with no live lease and no change for ``older_than`` seconds.

        Their current step is re-published by the reconciler: the bus may have lost it.
        """
