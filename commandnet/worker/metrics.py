"""Prometheus metrics of a worker, fed by the engine's observer hooks and two thin wrappers.

The :class:`PrometheusObserver` sees committed transitions, failed attempts and status changes.
Redeliveries and lease conflicts happen below the observer interface, so
:class:`InstrumentedBus` (wraps the bus's handler: counts ``Delivery.deliveries > 1`` and dead
letters) and :class:`InstrumentedStore` (wraps ``load_and_lock_agent``: counts each lease
outcome) report them without touching the engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..bus import Delivery, EventBus, Handler
from ..engine import Engine
from ..messages import CancelCommand, StepEvent, TriggerCommand
from ..observer import ErrorInfo, Observer, StatusInfo, TransitionInfo
from ..persistence import Persistence
from ..records import (
    AgentRecord,
    Commit,
    Failure,
    HistoryRecord,
    Lease,
    LeaseState,
    NewAgent,
    OutboxEntry,
)

# Steps range from microseconds (trivial nodes) to many minutes (LLM calls, human waits).
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0, 600.0, 1800.0)


class PrometheusObserver(Observer):
    """Counts and times what the engine reports; register one per process.

    Metric names (all prefixed ``commandnet_``): ``transitions_total{node,to_node}``,
    ``step_duration_seconds{node}``, ``step_failures_total{node}``, ``step_retries_total{node}``,
    ``agents_finished_total{status}``, ``steps_in_flight``, ``max_in_flight``,
    ``redeliveries_total``, ``dead_letters_total``, ``leases_total{result}`` and
    ``lease_conflicts_total`` (a step refused because another worker holds its lease or its
    retry backoff is still running).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.transitions = Counter(
            "commandnet_transitions", "Committed transitions, by node left and node entered "
            "(to_node empty: the agent finished)", ["node", "to_node"], registry=r)
        self.step_duration = Histogram(
            "commandnet_step_duration_seconds", "Run time of node attempts that committed",
            ["node"], buckets=STEP_BUCKETS, registry=r)
        self.failures = Counter(
            "commandnet_step_failures", "Node attempts that raised or timed out", ["node"],
            registry=r)
        self.retries = Counter(
            "commandnet_step_retries", "Failed node attempts that will be retried", ["node"],
            registry=r)
        self.finished = Counter(
            "commandnet_agents_finished", "Agents that reached a final status here",
            ["status"], registry=r)
        self.in_flight = Gauge(
            "commandnet_steps_in_flight", "Steps this process is running now", registry=r)
        self.max_in_flight = Gauge(
            "commandnet_max_in_flight", "Bound on steps this process runs at once", registry=r)
        self.redeliveries = Counter(
            "commandnet_redeliveries", "Bus messages received more than once", registry=r)
        self.dead_letters = Counter(
            "commandnet_dead_letters", "Bus messages set aside as unprocessable", registry=r)
        self.leases = Counter(
            "commandnet_leases", "Lease requests by outcome (granted, stale, busy, missing)",
            ["result"], registry=r)
        self.lease_conflicts = Counter(
            "commandnet_lease_conflicts", "Steps refused because their lease was held or their "
            "retry backoff still ran", registry=r)

    def bind(self, engine: Engine) -> None:
        """Read the in-flight gauges from ``engine`` at scrape time."""
        self.in_flight.set_function(lambda: engine.in_flight)
        self.max_in_flight.set(engine.max_in_flight)

    async def on_transition(self, info: TransitionInfo) -> None:
        self.transitions.labels(info.from_node, info.to_node or "").inc()
        self.step_duration.labels(info.from_node).observe(info.duration)

    async def on_error(self, info: ErrorInfo) -> None:
        self.failures.labels(info.node).inc()
        if not info.final:
            self.retries.labels(info.node).inc()

    async def on_status(self, info: StatusInfo) -> None:
        if info.status.is_final:
            self.finished.labels(info.status.value).inc()

    def count_delivery(self, delivery: Delivery) -> None:
        """A message arrived (a redelivery when it was delivered before)."""
        if delivery.deliveries > 1:
            self.redeliveries.inc()

    def count_lease(self, state: LeaseState) -> None:
        """A lease request ended in ``state``."""
        self.leases.labels(state.value).inc()
        if state is LeaseState.BUSY:
            self.lease_conflicts.inc()


class _CountedDelivery(Delivery):
    """Passes settlement through to the real delivery, counting dead letters."""

    def __init__(self, inner: Delivery, metrics: PrometheusObserver) -> None:
        self.inner, self.metrics = inner, metrics
        self.data, self.deliveries = inner.data, inner.deliveries

    async def ack(self) -> None:
        await self.inner.ack()

    async def nack(self, delay: float) -> None:
        await self.inner.nack(delay)

    async def in_progress(self) -> None:
        await self.inner.in_progress()

    async def dead_letter(self, reason: str) -> None:
        self.metrics.dead_letters.inc()
        await self.inner.dead_letter(reason)


class InstrumentedBus(EventBus):
    """The given bus, with every delivery counted before the engine handles it."""

    def __init__(self, inner: EventBus, metrics: PrometheusObserver) -> None:
        self.inner, self.metrics = inner, metrics
        self.durable = inner.durable  # the engine recovers differently on a non-durable bus

    async def connect(self) -> None:
        await self.inner.connect()

    async def publish(self, message: StepEvent | TriggerCommand | CancelCommand) -> None:
        await self.inner.publish(message)

    async def subscribe(self, handler: Handler) -> None:
        async def counted(delivery: Delivery) -> None:
            self.metrics.count_delivery(delivery)
            await handler(_CountedDelivery(delivery, self.metrics))

        await self.inner.subscribe(counted)

    async def unsubscribe(self) -> None:
        await self.inner.unsubscribe()

    async def close(self) -> None:
        await self.inner.close()


class InstrumentedStore(Persistence):
    """The given store, with the outcome of every lease request counted."""

    def __init__(self, inner: Persistence, metrics: PrometheusObserver) -> None:
        self.inner, self.metrics = inner, metrics

    async def setup(self) -> None:
        await self.inner.setup()

    async def close(self) -> None:
        await self.inner.close()

    async def load_and_lock_agent(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> Lease:
        lease = await self.inner.load_and_lock_agent(agent_id, step, owner, lease_seconds)
        self.metrics.count_lease(lease.state)
        return lease

    async def create_agent(self, agent: NewAgent) -> bool:
        return await self.inner.create_agent(agent)

    async def extend_lease(
        self, agent_id: str, step: int, owner: str, lease_seconds: float
    ) -> bool:
        return await self.inner.extend_lease(agent_id, step, owner, lease_seconds)

    async def save_state(self, commit: Commit) -> bool:
        return await self.inner.save_state(commit)

    async def record_failure(self, failure: Failure) -> bool:
        return await self.inner.record_failure(failure)

    async def release_lease(self, agent_id: str, step: int, owner: str) -> None:
        await self.inner.release_lease(agent_id, step, owner)

    async def cancel_agent(self, agent_id: str, reason: str) -> bool:
        return await self.inner.cancel_agent(agent_id, reason)

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        return await self.inner.get_agent(agent_id)

    async def get_history(self, agent_id: str) -> list[HistoryRecord]:
        return await self.inner.get_history(agent_id)

    async def pending_outbox(self, older_than: float, limit: int) -> list[OutboxEntry]:
        return await self.inner.pending_outbox(older_than, limit)

    async def clear_outbox(self, entries: Sequence[OutboxEntry]) -> None:
        await self.inner.clear_outbox(entries)

    async def stalled_agents(self, older_than: float, limit: int) -> list[OutboxEntry]:
        return await self.inner.stalled_agents(older_than, limit)
