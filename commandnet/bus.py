"""The bus interface: it carries "agent X should run step N" and commands from outside."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from .messages import AnyMessage


class Delivery(ABC):
    """One received message and the ways to settle it (exactly one of ack/nack/dead_letter)."""

    data: bytes
    deliveries: int  # 1 on the first delivery, more on redeliveries

    @abstractmethod
    async def ack(self) -> None:
        """Done with it: never deliver it again."""

    @abstractmethod
    async def nack(self, delay: float) -> None:
        """Not now: deliver it again after ``delay`` seconds."""

    @abstractmethod
    async def in_progress(self) -> None:
        """Still working on it: postpone the redelivery deadline."""

    @abstractmethod
    async def dead_letter(self, reason: str) -> None:
        """Unprocessable: set it aside with a reason, never redeliver it."""


Handler = Callable[[Delivery], Awaitable[None]]


class EventBus(ABC):
    """Publishes step events and commands; delivers them at least once to a subscriber.

    ``durable`` is False for a bus whose messages die with the process (the in-memory one):
    a worker starting on such a bus re-publishes every running agent that holds no live lease.
    ``pool`` is the worker pool (graph) whose messages this bus carries; an engine on it runs
    and repairs only that pool's agents.
    """

    durable: bool = True
    pool: str = "default"

    async def connect(self) -> None:
        """Connect and create what the bus needs (idempotent). Called by the engine at start."""

    @abstractmethod
    async def publish(self, message: AnyMessage) -> bool | None:
        """Publish a message; a repeat of one ``dedup_id`` may be dropped by the bus.

        False: a step event was handed to this process's own subscriber instead of being
        published; the caller keeps its outbox row (the step's commit deletes it).
        """

    def hands_over(self) -> bool:
        """Whether a step event published now, by a handler, would be handed to this
        process's own subscriber (``publish`` returning False) rather than published."""
        return False

    @abstractmethod
    async def subscribe(self, handler: Handler) -> None:
        """Start delivering messages to ``handler`` in the background; returns at once."""

    @abstractmethod
    async def unsubscribe(self) -> None:
        """Stop fetching new messages; messages already handed out may still be settled."""

    async def undelivered_age(self) -> float:
        """Seconds the oldest message not yet delivered to this pool has waited (0.0: none, or
        the bus cannot tell). Agents changed since then are queued behind it, not stalled."""
        return 0.0

    async def close(self) -> None:
        """Disconnect."""
