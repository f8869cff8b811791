"""Hooks for metrics, logs and status mirrors. Observers must not raise; errors are logged."""

from __future__ import annotations

from dataclasses import dataclass

from .records import AgentStatus


@dataclass(frozen=True)
class TransitionInfo:
    """A committed transition (``to_node`` None: the agent finished)."""

    agent_id: str
    step: int
    from_node: str
    to_node: str | None
    status: AgentStatus
    duration: float
    attempts: int


@dataclass(frozen=True)
class ErrorInfo:
    """A failed attempt of a node; ``final`` when the agent is now failed."""

    agent_id: str
    step: int
    node: str
    error: BaseException
    attempt: int
    final: bool
    retry_in: float | None


@dataclass(frozen=True)
class StatusInfo:
    """An agent's latest status, after any change (transition, failure, cancellation)."""

    agent_id: str
    status: AgentStatus
    node: str
    step: int
    error: str | None


@dataclass(frozen=True)
class DeliveryInfo:
    """A bus message the engine received, and what became of it."""

    kind: str  # "step", "trigger", "cancel", or "malformed"
    deliveries: int  # 1 the first time; more on redeliveries
    outcome: str  # a step's lease result (granted, stale, busy, missing), "handled", "dead_letter"


class Observer:
    """Override what you need; every method is called after the change is committed.

    ``on_transition`` and ``on_error`` keep the seed's signatures; ``on_step`` and
    ``on_step_error`` carry the same events as records with every detail.
    """

    async def on_transition(
        self, agent_id: str, from_node: str, to_node: str | None, duration_ms: float
    ) -> None:
        """A transition was committed (``to_node`` None: the agent finished)."""

    async def on_error(self, agent_id: str, node: str, error: BaseException) -> None:
        """A node attempt failed (retried unless it was the last)."""

    async def on_step(self, info: TransitionInfo) -> None:
        """A transition was committed: the full record."""

    async def on_step_error(self, info: ErrorInfo) -> None:
        """A node attempt failed (retried unless ``info.final``): the full record."""

    async def on_status(self, info: StatusInfo) -> None:
        """The agent's status changed; status mirrors (the NATS KV bucket) hook in here."""

    async def on_delivery(self, info: DeliveryInfo) -> None:
        """A message was received and its fate decided (metrics of leases and redeliveries)."""

    async def close(self) -> None:
        """Flush what you buffer: ``Engine.stop`` calls it after draining, before the bus
        closes."""
