"""One worker process: load the graphs, connect store and bus, consume, serve probes, drain.

Life of a worker: load and validate every ``--graph`` (fail fast, naming the one at fault);
connect the store (running its migrations when asked) and the bus, each within
``connect_timeout``; on NATS, publish the pool's graph to the graph bucket (for the operator; a
failure is only a warning); start consuming; answer ``/readyz`` with 200. On SIGTERM or SIGINT it
drains: ``/readyz`` turns 503, fetching stops, in-flight steps get ``drain_grace`` seconds to
commit, and whatever is still running is cancelled and handed back (lease released, message
nacked for immediate redelivery to another worker). Then it exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..adapters.urls import bus_from_url, store_from_url
from ..bus import EventBus
from ..engine import Engine
from ..errors import CommandNetError
from ..graph import GraphAnalyzer, NodeClass
from ..loading import GraphLoadError, describe_pool, load_graph
from ..observer import Observer
from ..persistence import Persistence
from ..tracing import active as tracing_active
from ..tracing.setup import setup_tracing
from .handoff import OutboxRescue
from .http import ProbeServer
from .logs import LogObserver
from .metrics import PrometheusObserver
from .resync import StatusResync
from .settings import WorkerSettings, mask_url

log = logging.getLogger("commandnet.worker")
T = TypeVar("T")

_PROBE_AGENT = "commandnet-readyz-probe"


class WorkerStartupError(CommandNetError):
    """The worker cannot start: a bad URL, or the store or bus cannot be reached."""


class Worker:
    """A worker process's parts and its lifecycle; :meth:`run` returns the exit code."""

    def __init__(self, settings: WorkerSettings, metrics: PrometheusObserver | None = None,
                 store: Persistence | None = None, bus: EventBus | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or PrometheusObserver()
        self.graphs = self._load_graphs()
        # The SDK provider and OTLP exporter, when OTEL_* configures one (docs/tracing.md).
        self.stop_tracing = setup_tracing("commandnet-worker")
        self.store = store or self._build("store", settings.store_url,
                                          lambda: _make_store(settings))
        if hasattr(self.store, "apply_migrations"):  # PostgreSQL; SQLite always creates its own
            self.store.apply_migrations = settings.migrate
        self.bus = bus or self._build("bus", settings.bus_url,
                                      lambda: _make_bus(settings, self.store))
        mirrors = _status_observers(self.bus, settings.status_flush_interval)
        self.engine = Engine(
            self.store,
            self.bus,
            graphs=self.graphs,
            observers=[self.metrics, LogObserver(), *mirrors, *_tracing_observers()],
            owner=settings.worker_id,
            lease_seconds=settings.lease_seconds,
            max_in_flight=settings.max_in_flight,
            sweep_interval=settings.sweep_interval,
            outbox_grace=settings.outbox_grace,
            stall_after=settings.stall_after,
            reconcile_batch=settings.reconcile_batch,
            wake_interval=settings.wake_interval,
            node_grace=settings.node_grace,
        )
        self.metrics.bind(self.engine)
        self.resync = StatusResync(self.store, self.engine.pool, self.engine.owner, mirrors,
                                   interval=settings.sweep_interval)
        # Steps handed over locally are recovered by every worker, not only the sweeping one.
        self.rescue = (OutboxRescue(self.store, self.bus, interval=settings.sweep_interval,
                                    grace=settings.outbox_grace)
                       if getattr(self.bus, "local_handoff", 0) else None)
        self.http = ProbeServer(settings.http_host, settings.http_port, self.ready,
                                self.metrics.registry)
        self.stopping = asyncio.Event()
        self.consuming = False
        self.draining = False

    def _load_graphs(self) -> list[NodeClass]:
        if not self.settings.graph:
            raise GraphLoadError("no graph to run: give --graph pkg.module:StartNode "
                                 "(or set COMMANDNET_GRAPH)")
        return [load_graph(spec) for spec in self.settings.graph]

    @staticmethod
    def _build(kind: str, url: str, make: Callable[[], T]) -> T:
        try:
            return make()
        except ImportError as exc:
            raise WorkerStartupError(
                f"{kind} URL {mask_url(url)!r} needs a driver that is not installed ({exc}); "
                f"pip install 'commandnet[worker]'"
            ) from None
        except (CommandNetError, ValueError) as exc:
            raise WorkerStartupError(f"bad {kind} URL {mask_url(url)!r}: {exc}") from None

    # ------------------------------------------------------------------ probes

    async def ready(self) -> tuple[bool, str]:
        """Ready when consuming, not draining, and the store answers a query."""
        if self.draining:
            return False, "draining"
        if not self.consuming:
            return False, "starting"
        connected = _bus_connected(self.bus)
        if connected is False:
            return False, f"bus {mask_url(self.settings.bus_url)} disconnected"
        try:
            await self.store.get_agent(_PROBE_AGENT)
        except Exception as exc:
            return False, (f"store {mask_url(self.settings.store_url)} unreachable: "
                           f"{type(exc).__name__}: {exc}")
        return True, "ready"

    # --------------------------------------------------------------- lifecycle

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), drain; returns 0."""
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
                handled.append(sig)
        try:
            try:
                await self.http.start()
            except OSError as exc:
                raise WorkerStartupError(
                    f"cannot serve probes on {self.settings.http_host}:{self.settings.http_port}"
                    f" (COMMANDNET_HTTP_PORT): {exc.strerror or exc}"
                ) from None
            starting = asyncio.create_task(self._start())
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # asked to stop while still connecting
                stop.cancel()
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await starting
                await self._close_quietly()
                log.info("stopped before start-up finished")
                return 0
            stop.cancel()
            starting.result()  # re-raise a start-up failure
            await self.stopping.wait()
            await self.drain()
            return 0
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self.http.close()
            if self.stop_tracing is not None:  # flush the spans still batched
                await asyncio.to_thread(self.stop_tracing)

    def request_stop(self, why: str = "request") -> None:
        """Begin the graceful drain (signal handlers call this)."""
        if self.stopping.is_set():
            log.warning("%s received while draining; still draining", why)
            return
        log.info("%s received: draining", why, extra={"signal": why})
        self.stopping.set()

    async def _start(self) -> None:
        s = self.settings
        try:
            await self._within("store", s.store_url, self.store.setup())
            await self._within("bus", s.bus_url, self.bus.connect())
            await self._publish_graph()
            await self.engine.start_worker()
            self.metrics.watch_backlog(self.bus)  # JetStream only; stops at Engine.stop
            self.resync.start()
            if self.rescue is not None:
                self.rescue.start()
        except BaseException:
            await self._close_quietly()
            raise
        self.consuming = True
        log.info("worker %s consuming pool %r with graphs %s", s.worker_id, s.pool,
                 ", ".join(s.graph), extra={"settings": s.summary()})

    async def _publish_graph(self) -> None:
        """Publish the pool's graph to the bus's graph bucket (JetStream only). A failure is a
        warning: the operator then admits Agents unchecked, and this worker still decides."""
        if "commandnet.adapters.nats" not in sys.modules:  # no bus uses NATS
            return
        from ..adapters.nats import JetStreamBus
        from ..adapters.nats_graphs import publish_graph

        bus = self.bus
        if not isinstance(bus, JetStreamBus):
            return
        try:
            doc = describe_pool(self.engine.pool, [GraphAnalyzer.validate(g)
                                                   for g in self.graphs])
            written = await asyncio.wait_for(
                publish_graph(bus.jetstream(), doc, bus.replicas, bucket=bus.graph_bucket),
                self.settings.connect_timeout)
        except Exception as exc:
            log.warning("graph of pool %r not published to bucket %r: %s: %s", bus.pool,
                        bus.graph_bucket, type(exc).__name__, exc)
            return
        log.info("graph of pool %r %s bucket %r (version %s)", bus.pool,
                 "published to" if written else "already in", bus.graph_bucket,
                 doc["version"][:12])

    async def _within(self, kind: str, url: str, step: Awaitable[None]) -> None:
        timeout = self.settings.connect_timeout
        try:
            await asyncio.wait_for(step, timeout)
        except TimeoutError:
            raise WorkerStartupError(
                f"cannot reach the {kind} at {mask_url(url)} within {timeout:g}s "
                f"(COMMANDNET_CONNECT_TIMEOUT)"
            ) from None
        except CommandNetError:
            raise
        except Exception as exc:
            raise WorkerStartupError(
                f"cannot reach the {kind} at {mask_url(url)}: {type(exc).__name__}: {exc}"
            ) from exc

    async def drain(self) -> None:
        """Stop fetching, give in-flight steps ``drain_grace`` s, hand back the rest, close."""
        self.draining = True
        busy = self.engine.in_flight
        log.info("draining: %d step(s) in flight, %.0fs grace", busy, self.settings.drain_grace,
                 extra={"in_flight": busy})
        await self.resync.stop()
        if self.rescue is not None:
            await self.rescue.stop()
        await self.engine.stop(grace=self.settings.drain_grace)
        self.consuming = False
        log.info("drained; worker %s stopped", self.settings.worker_id)

    async def _close_quietly(self) -> None:
        for closer in (self.bus.close, self.store.close):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(closer(), 5.0)


async def run_worker(settings: WorkerSettings) -> int:
    """Run a worker until it is signalled; returns the process exit code."""
    return await Worker(settings).run()


def _status_observers(bus: EventBus, flush_interval: float = 0.25) -> list[Observer]:
    """The NATS KV status mirror when the bus is JetStream (the operator watches it)."""
    nats_adapter = sys.modules.get("commandnet.adapters.nats")  # loaded iff a bus uses it
    if nats_adapter is None or not isinstance(bus, nats_adapter.JetStreamBus):
        return []
    observer: Observer = nats_adapter.JetStreamStatusObserver(bus,
                                                              flush_interval=flush_interval)
    return [observer]


def _tracing_observers() -> list[Observer]:
    """The observer that names each step span's node, attempt and outcome, when tracing."""
    if not tracing_active():
        return []
    from ..tracing.observer import TracingObserver

    return [TracingObserver()]


def _bus_connected(bus: EventBus) -> bool | None:
    """Whether the bus says it is connected; None when it cannot tell."""
    flag = getattr(bus, "is_connected", None)
    if callable(flag):
        flag = flag()
    return flag if isinstance(flag, bool) else None


def _make_store(settings: WorkerSettings) -> Persistence:
    """The store, its password, TLS mode and pool sizes passed as such (never in the URL)."""
    url, connection = settings.store_connection()
    return store_from_url(url, **connection)


def _make_bus(settings: WorkerSettings, store: Persistence | None = None) -> EventBus:
    """The bus, its credentials and TLS passed as such (never inside the URL)."""
    url, connection = settings.bus_connection()
    return bus_from_url(url, settings.pool, **connection, **_bus_options(settings, store))


def _bus_options(settings: WorkerSettings, store: Persistence | None = None) -> dict[str, Any]:
    """Bus options from the settings (only JetStream takes any). Steps are handed over
    locally only with a store whose commit deletes the step's outbox row (PostgreSQL)."""
    if not settings.bus_url.startswith(("nats", "tls")):
        return {}
    handoff = settings.local_handoff if getattr(store, "commit_clears_outbox", False) else 0
    return {**settings.jetstream_options(), "local_handoff": handoff}
