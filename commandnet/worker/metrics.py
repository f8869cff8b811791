"""Prometheus metrics of a worker, fed by the engine's observer hooks."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import Engine
from ..observer import DeliveryInfo, ErrorInfo, Observer, StatusInfo, TransitionInfo
from ..records import LeaseState

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

    async def on_step(self, info: TransitionInfo) -> None:
        self.transitions.labels(info.from_node, info.to_node or "").inc()
        self.step_duration.labels(info.from_node).observe(info.duration)

    async def on_step_error(self, info: ErrorInfo) -> None:
        self.failures.labels(info.node).inc()
        if not info.final:
            self.retries.labels(info.node).inc()

    async def on_status(self, info: StatusInfo) -> None:
        if info.status.is_final:
            self.finished.labels(info.status.value).inc()

    async def on_delivery(self, info: DeliveryInfo) -> None:
        if info.deliveries > 1:
            self.redeliveries.inc()
        if info.outcome == "dead_letter":
            self.dead_letters.inc()
        elif info.kind == "step":
            self.leases.labels(info.outcome).inc()
            if info.outcome == LeaseState.BUSY.value:
                self.lease_conflicts.inc()
