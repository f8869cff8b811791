"""Prometheus metrics of a worker, fed by the engine's observer hooks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import __version__
from ..bus import EventBus
from ..engine import Engine
from ..observer import DeliveryInfo, ErrorInfo, Observer, StatusInfo, TransitionInfo
from ..records import LeaseState

log = logging.getLogger("commandnet.worker.metrics")

# Steps range from microseconds (trivial nodes) to many minutes (LLM calls, human waits).
STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0, 600.0, 1800.0)
# Seconds between two reads of the pool's consumer info: a scrape interval is usually 15-30 s,
# and every replica of a pool reads it, so keep it cheap.
BACKLOG_INTERVAL = 10.0

BacklogReader = Callable[[], Awaitable[tuple[int, int]]]
"""Returns the pool's (pending, ack-pending) message counts."""


class PrometheusObserver(Observer):
    """Counts and times what the engine reports; register one per process.

    Metric names (all prefixed ``commandnet_``): ``transitions_total{node,to_node}``,
    ``step_duration_seconds{node}``, ``step_failures_total{node}``, ``step_retries_total{node}``,
    ``agents_finished_total{status}``, ``steps_in_flight``, ``max_in_flight``,
    ``redeliveries_total``, ``dead_letters_total``, ``leases_total{result}``,
    ``lease_conflicts_total`` (a step refused because another worker holds its lease or its
    retry backoff is still running), ``worker_info{pool,version}`` (always 1: join on
    ``job, instance`` to give any of this process's series its pool) and
    ``pool_backlog_messages{pool,state}`` (JetStream only: the pool's consumer's ``pending``
    and ``ack_pending`` messages, read every ``backlog_interval`` seconds once
    :meth:`watch_backlog` is called).
    """

    def __init__(self, registry: CollectorRegistry | None = None,
                 backlog_interval: float = BACKLOG_INTERVAL) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.backlog_interval = backlog_interval
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
        # One series per process (multiprocess_mode: one per pod when processes share a
        # registry), so `* on (job, instance) group_left (pool)` never meets two.
        self.info = Gauge(
            "commandnet_worker_info", "Always 1: the pool this worker serves and its version",
            ["pool", "version"], registry=r, multiprocess_mode="livemax")
        self.backlog = Gauge(
            "commandnet_pool_backlog_messages", "The pool's JetStream consumer: messages not "
            "delivered yet (state=pending) and delivered but not acknowledged "
            "(state=ack_pending); every replica of a pool reports the same", ["pool", "state"],
            registry=r, multiprocess_mode="livemax")
        self._backlog_task: asyncio.Task[None] | None = None

    def bind(self, engine: Engine) -> None:
        """Read the in-flight gauges from ``engine`` at scrape time; name its pool."""
        self.in_flight.set_function(lambda: engine.in_flight)
        self.max_in_flight.set(engine.max_in_flight)
        self.info.labels(engine.pool, __version__).set(1)

    def watch_backlog(self, bus: EventBus, interval: float | None = None) -> bool:
        """Refresh ``commandnet_pool_backlog_messages`` from ``bus`` every ``interval`` s
        (default ``backlog_interval``) until :meth:`close`; False (and nothing started) when
        the bus cannot tell its backlog (only JetStream can). Call it on a running loop, once
        the bus is connected."""
        read = backlog_reader(bus)
        if read is None:
            return False
        if self._backlog_task is None or self._backlog_task.done():
            self._backlog_task = asyncio.create_task(
                self._refresh_backlog(bus.pool, read, interval or self.backlog_interval),
                name=f"commandnet-backlog-{bus.pool}")
        return True

    async def _refresh_backlog(self, pool: str, read: BacklogReader, interval: float) -> None:
        failing = False
        while True:
            try:
                pending, ack_pending = await asyncio.wait_for(read(), max(interval, 2.0))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:  # once per outage, not once per interval
                    log.warning("cannot read the backlog of pool %r: %s: %s", pool,
                                type(exc).__name__, exc)
                failing = True
                self._forget_backlog(pool)  # no number rather than a stale one
            else:
                if failing:
                    log.info("backlog of pool %r readable again", pool)
                failing = False
                self.backlog.labels(pool, "pending").set(pending)
                self.backlog.labels(pool, "ack_pending").set(ack_pending)
            await asyncio.sleep(interval)

    def _forget_backlog(self, pool: str) -> None:
        for state in ("pending", "ack_pending"):
            with contextlib.suppress(KeyError):
                self.backlog.remove(pool, state)

    async def close(self) -> None:
        """Stop refreshing the backlog (``Engine.stop`` calls this before closing the bus)."""
        task, self._backlog_task = self._backlog_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self.backlog.clear()

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


def backlog_reader(bus: EventBus) -> BacklogReader | None:
    """How to read ``bus``'s backlog as KEDA counts it (pending, ack-pending messages of the
    pool's durable consumer); None for a bus that cannot tell (in-memory)."""
    nats_adapter = sys.modules.get("commandnet.adapters.nats")  # loaded iff a bus uses it
    if nats_adapter is None or not isinstance(bus, nats_adapter.JetStreamBus):
        return None
    jetstream_bus = bus

    async def read() -> tuple[int, int]:
        info = await jetstream_bus.jetstream().consumer_info(jetstream_bus.stream,
                                                             jetstream_bus.consumer)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    return read
