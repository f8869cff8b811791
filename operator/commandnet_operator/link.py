"""The operator's one NATS connection: publish commands, watch the status and graph buckets.

Publish-only: it never creates or changes a stream, consumer or bucket (workers and
``commandnet pools ensure`` do). It starts even when NATS is down, and keeps trying.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from typing import Any

import nats.errors
import nats.js.errors

from commandnet.adapters.connection import server_address
from commandnet.adapters.nats_graphs import GraphCatalog
from commandnet.adapters.nats_status import StatusReader
from commandnet.errors import CommandNetError
from commandnet.messages import (
    CancelCommand,
    ResumeCommand,
    SignalCommand,
    TriggerCommand,
    encode,
)
from commandnet.tracing import active as tracing_active

from .metrics import BUS_UP
from .settings import OperatorSettings

log = logging.getLogger("commandnet.operator")
Command = TriggerCommand | CancelCommand | SignalCommand | ResumeCommand


class NotSent(Exception):
    """A command did not reach JetStream; ``reason`` is CamelCase for the Agent's condition."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StatusBoard:
    """The latest bucket value of each watched agent, and a wake-up per watcher.

    Values of agents nobody watches yet (a status can arrive before its Agent's daemon
    starts, and a watch replays every finished agent too) wait in a bounded cache.
    """

    def __init__(self, unclaimed_limit: int = 10_000) -> None:
        self.values: dict[str, dict[str, Any]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._unclaimed: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
        self._unclaimed_limit = unclaimed_limit

    def put(self, agent_id: str, value: dict[str, Any] | None) -> None:
        """Record a bucket change (None: the key was deleted)."""
        event = self._events.get(agent_id)
        if event is None:
            self._unclaimed[agent_id] = value
            self._unclaimed.move_to_end(agent_id)
            while len(self._unclaimed) > self._unclaimed_limit:
                self._unclaimed.popitem(last=False)
            return
        if value is None:
            self.values.pop(agent_id, None)
        else:
            self.values[agent_id] = value
        event.set()

    def watch(self, agent_id: str) -> asyncio.Event:
        """An event set at each change of ``agent_id`` (and of the bus's state)."""
        if agent_id not in self._events:
            self._events[agent_id] = asyncio.Event()
            early = self._unclaimed.pop(agent_id, None)
            if early is not None:
                self.values[agent_id] = early
        return self._events[agent_id]

    def unwatch(self, agent_id: str) -> None:
        """Stop watching ``agent_id`` and forget its value (its Agent is finished or gone)."""
        self._events.pop(agent_id, None)
        self.values.pop(agent_id, None)

    def poke(self, agent_id: str) -> bool:
        """Wake the watcher of ``agent_id`` (its spec changed); False when nobody watches."""
        event = self._events.get(agent_id)
        if event is None:
            return False
        event.set()
        return True

    def wake_all(self) -> None:
        """Wake every watcher (the bus went away or came back)."""
        for event in self._events.values():
            event.set()

def is_agent_made(agent_id: str) -> bool:
    """Whether an id has an Agent's form (namespace/name/uid): other agents are not ours."""
    return agent_id.count("/") == 2


class BusLink:
    """Connects (and reconnects) to NATS; feeds the board and the graph catalog."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        url, connection = settings.bus_connection()
        self.reader = StatusReader(url, bucket=settings.status_bucket,
                                   auth=connection.get("auth"))
        self.board = StatusBoard()
        self.catalog: GraphCatalog | None = None
        self.available = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def where(self) -> str:
        """The NATS servers as ``host:port`` (never credentials)."""
        return ", ".join(server_address(s) for s in self.reader.servers)

    def start(self) -> None:
        """Connect in the background and keep the board current."""
        self._tasks = [asyncio.create_task(self._run(), name="commandnet-bus"),
                       asyncio.create_task(self._monitor(), name="commandnet-bus-monitor")]

    async def stop(self) -> None:
        """Stop watching and disconnect."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.catalog is not None:
            with contextlib.suppress(Exception):
                await self.catalog.stop()
        with contextlib.suppress(Exception):
            await self.reader.close()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            try:
                await self.reader.connect()
                break
            except (CommandNetError, nats.errors.Error, OSError, TimeoutError) as exc:
                log.warning("NATS at %s not ready (%s); retrying in %.0fs",
                            self.where, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        assert self.reader.nc is not None
        self.catalog = GraphCatalog(self.reader.nc,
                                    bucket=self.settings.graph_bucket)
        await self.catalog.start()
        log.info("watching status bucket %r and graph bucket %r", self.settings.status_bucket,
                 self.settings.graph_bucket)
        async for update in self.reader.watch():
            if is_agent_made(update.agent_id):
                self.board.put(update.agent_id, update.status)

    async def _monitor(self) -> None:
        """Notice the connection going and coming back (the Agents' BusAvailable condition)."""
        while True:
            nc = self.reader.nc
            now = nc is not None and nc.is_connected
            if now != self.available:
                self.available = now
                BUS_UP.set(1 if now else 0)
                log.log(logging.INFO if now else logging.WARNING, "NATS %s",
                        "connected" if now else "unreachable")
                self.board.wake_all()
            await asyncio.sleep(1.0)

    def graph(self, pool: str) -> dict[str, Any] | None:
        """The pool's published graph, or None (none published, or not connected yet)."""
        return self.catalog.get(pool) if self.catalog is not None else None

    async def send(self, pool: str, command: Command) -> str | None:
        """Publish a command to ``pool``; :class:`NotSent` says why not. While tracing is on,
        a trigger is the root span of the agent's trace, whose id is returned (else None)."""
        nc = self.reader.nc
        if nc is None or not nc.is_connected:
            raise NotSent("BusUnavailable", f"NATS at {self.where} is unreachable")
        subject = f"commandnet.{pool}.commands"
        if not tracing_active():
            await self._publish(nc, subject, command, {})
            return None
        from commandnet.tracing.spans import publishing, trace_id_of

        with publishing(command, subject, pool) as headers:
            await self._publish(nc, subject, command, headers)
        return trace_id_of(headers.get("traceparent")) if isinstance(command,
                                                                     TriggerCommand) else None

    @staticmethod
    async def _publish(nc: Any, subject: str, command: Command,
                       headers: dict[str, str]) -> None:
        pool = subject.split(".")[1]
        try:
            await nc.jetstream().publish(subject, encode(command),
                                         headers={**headers, "Nats-Msg-Id": command.dedup_id},
                                         timeout=5.0)
        except nats.js.errors.NoStreamResponseError:
            raise NotSent("PoolNotServed",
                          f"no JetStream stream takes {subject!r}: no worker of pool {pool!r} "
                          f"has started and `commandnet pools ensure --pool {pool}` has not "
                          "run") from None
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise NotSent("BusUnavailable",
                          f"publish to {subject!r} failed: {type(exc).__name__}: {exc}") from None
