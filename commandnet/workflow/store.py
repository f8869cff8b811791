"""What a store does for the workflow features (timers, signals, resume): part of
:class:`~commandnet.persistence.Persistence`, declared here, next to the features."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..records import OutboxEntry, SignalOutcome


class WorkflowStore(ABC):
    """Parked agents: due times, signals, resume. Fan-out is part of ``save_state``."""

    @abstractmethod
    async def wake_due(self, pool: str, limit: int) -> list[OutboxEntry]:
        """Wake parked agents of ``pool`` whose ``wake_at`` has come, oldest first: a timer, a
        signal that arrived, or a signal wait that ran out (which moves the agent to its
        timeout node at the next step, with a ``timeout`` history row). Each woken agent's
        step event is written to the outbox in the same transaction; returns those events.
        Safe to call from every worker at once (each agent is woken once)."""

    @abstractmethod
    async def signal_agent(self, agent_id: str, name: str, signal_id: str,
                           payload: Any) -> SignalOutcome:
        """Keep a signal for a running agent, and deliver it if the agent waits for ``name``:
        its payload becomes the step's payload and the agent is due now. A signal id seen
        before changes nothing (DUPLICATE). Serialised with commits on the agent's row, so a
        signal racing a commit that starts the wait is never lost."""

    @abstractmethod
    async def resume_agent(self, agent_id: str, node: str, context: dict[str, Any],
                           pool: str = "default") -> bool:
        """Run a failed or cancelled agent of ``pool`` again from ``node`` with ``context``, at
        the next step (a ``resume`` history row; attempts, error and parking cleared; the step
        event in the outbox). False when the agent is not failed or cancelled."""
