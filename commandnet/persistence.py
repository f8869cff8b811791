"""The store interface. The store, not the bus, is the truth about every agent.

Every method that changes a running agent is fenced: it applies only while ``owner`` holds the
lease on exactly ``step`` of a running agent, so a stale worker, a duplicate event or a
cancellation can never double or resurrect a transition. Implementations must make each method
one atomic transaction. Times are epoch seconds from the store's own clock, read after any write
lock is taken. Every agent row records its pool; the repair methods only touch one pool's rows.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from .records import (
    AgentRecord,
    Commit,
    Failure,
    HistoryRecord,
    Lease,
    NewAgent,
    OutboxEntry,
    SweepClaim,
)
from .worker.resync_store import ResyncStore
from .workflow.store import WorkflowStore


class Persistence(WorkflowStore, ResyncStore):
    """Durable agent state with step-fenced leases and a transactional outbox (and what the
    workflow features and the status resync need, declared in their own packages)."""

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
        self, agent_id: str, step: int, owner: str, lease_seconds: float, pool: str = "default",
        alone: bool = False,
    ) -> Lease:
        """Lease ``step`` of a running agent of ``pool`` if no live lease or retry delay stands
        in the way (FOREIGN for another pool's agent, which is left alone; STALE while the agent
        is parked, as only :meth:`wake_due` publishes a parked agent's step). Leasing a fan-out's
        join step gives it the branches' results as its payload (see ``Commit``).

        Taking the lease counts an attempt, and a crash when the previous lease was never
        settled (its worker died holding it), so a step that kills its worker runs out of
        attempts like one that raises. ``alone``: this worker holds no other step, and if the
        step has crashed before it will run alone (the lease records that). A death in a run
        that was not alone may have been any step's doing, so that attempt is given back.
        """

    @abstractmethod
    async def extend_lease(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> bool:
        """Keep a lease alive during a long node; False when it was lost (cancelled, taken)."""

    @abstractmethod
    async def save_state(self, commit: Commit) -> bool:
        """Commit a transition, its history row and (if not final) its outbox event; parking and
        fan-out as ``Commit`` says; a branch that succeeds counts down its parent.

        Returns False, changing nothing, when the fence fails.
        """

    @abstractmethod
    async def record_failure(self, failure: Failure) -> bool:
        """Store a failed attempt (or fail the agent when final: a branch then counts down its
        parent, see ``Commit``); False when the fence fails."""

    @abstractmethod
    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        """Give a lease back without a transition (worker draining), and its attempt with it."""

    @abstractmethod
    async def cancel_agent(self, agent_id: str, reason: str, pool: str = "default") -> bool:
        """Mark a running agent cancelled (parked ones too), and its running branches and theirs;
        False when it is already final. A cancelled branch counts as ended for its parent.

        An unknown id gets a cancelled tombstone (empty start node) that a later trigger of the
        id respects: commands from different workers may overtake each other.
        """

    @abstractmethod
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        """The agent's row, or None."""

    @abstractmethod
    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        """Committed transitions of an agent, in step order."""

    @abstractmethod
    async def pending_outbox(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        """Outbox events of ``pool`` (None: every pool) written more than ``older_than`` seconds
        ago (a publish was lost), oldest first."""

    @abstractmethod
    async def clear_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        """Forget outbox events that have been published."""

    @abstractmethod
    async def stalled_agents(
        self, older_than: float, limit: int, pool: str | None = None
    ) -> list[OutboxEntry]:
        """Claim running agents of ``pool`` that are not parked, with no live lease and neither
        a change nor a claim for ``older_than`` seconds; oldest first.

        Their current step is re-published by the reconciler (the bus may have lost it); the
        claim is recorded, so one agent is returned at most once per ``older_than``.
        """

    @abstractmethod
    async def claim_sweep(self, pool: str, owner: str, seconds: float) -> SweepClaim | None:
        """Take or renew ``pool``'s repair turn for ``seconds``; None while another owner has
        it. One sweeper per pool bounds the repair traffic whatever the number of workers."""
