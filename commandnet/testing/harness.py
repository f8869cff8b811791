"""Crash a worker at every point of the durability protocol, recover, compare with a clean run."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from typing_extensions import override

from ..adapters.memory import InMemoryPersistence
from ..engine import Engine
from ..graph import NodeClass
from ..messages import AnyMessage, StepEvent
from ..records import Commit
from .vbus import VirtualClock, VirtualTimeBus

CRASH_POINTS = ("before_commit", "after_commit", "after_publish")
"""Where a worker can die: node ran but nothing committed; committed but the next event not
published; published but the incoming message not acknowledged."""


class SimulatedCrash(BaseException):
    """The simulated worker process died (a BaseException, so user code cannot swallow it)."""


Hook = Callable[[str, str, int], None]  # (crash point, agent id, step being run)


class _CrashingStore(InMemoryPersistence):
    """The reference store, with the crash points around the commit."""

    def __init__(self, clock: VirtualClock, hook: Hook) -> None:
        super().__init__(clock=clock)
        self.hook = hook

    @override
    async def save_state(self, commit: Commit) -> bool:
        self.hook("before_commit", commit.agent_id, commit.step)
        saved = await super().save_state(commit)
        if saved:
            self.hook("after_commit", commit.agent_id, commit.step)
        return saved


class _CrashingBus(VirtualTimeBus):
    """The virtual-time bus, with the crash point after a step's next event is published."""

    def __init__(self, clock: VirtualClock, hook: Hook) -> None:
        super().__init__(clock)
        self.hook = hook
        self.stepping = False  # set while the harness hands a delivery to the engine

    @override
    async def publish(self, message: AnyMessage) -> None:
        await super().publish(message)
        if self.stepping and isinstance(message, StepEvent):
            self.hook("after_publish", message.agent_id, message.step - 1)


@dataclass(frozen=True)
class Outcome:
    """What must not depend on crashes: each agent's final row and its transitions."""

    agents: dict[str, tuple[str, str, int, str]]  # status, node, step, context (JSON)
    history: dict[str, list[tuple[int, str, str | None]]]  # step, from, to

    def diff(self, other: Outcome) -> list[str]:
        """Human-readable differences, one per agent that differs."""
        lines = []
        for agent_id in sorted(set(self.agents) | set(other.agents)):
            if self.agents.get(agent_id) != other.agents.get(agent_id):
                lines.append(f"{agent_id}: state {self.agents.get(agent_id)} != "
                             f"{other.agents.get(agent_id)}")
            if self.history.get(agent_id) != other.history.get(agent_id):
                lines.append(f"{agent_id}: history {self.history.get(agent_id)} != "
                             f"{other.history.get(agent_id)}")
        return lines


@dataclass
class FaultReport:
    """What :meth:`FaultHarness.check` did: the clean outcome and the crash runs per point."""

    clean: Outcome
    crashes: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Crash runs performed."""
        return sum(self.crashes.values())


class FaultHarness:
    """Runs agents of one graph on in-memory adapters with virtual time, crashing on demand.

    Nodes must be deterministic given their context (side effects are at-least-once: a crash
    before the commit runs a node again). ``reset`` is called before every run, to reset any
    state your nodes keep outside the context (say, a fake payment provider).
    """

    def __init__(
        self,
        start: NodeClass,
        agents: Mapping[str, BaseModel | Mapping[str, Any]],
        *,
        reset: Callable[[], None] | None = None,
        lease_seconds: float = 30.0,
        max_deliveries: int = 100_000,
    ) -> None:
        self.start = start
        self.agents = dict(agents)
        self.reset = reset
        self.lease_seconds = lease_seconds
        self.max_deliveries = max_deliveries

    async def check(self, points: tuple[str, ...] = CRASH_POINTS) -> FaultReport:
        """Crash at each point, at each occurrence in turn; AssertionError on any difference."""
        clean, _ = await self.run()
        report = FaultReport(clean)
        for point in points:
            occurrence = 0
            while True:
                outcome, fired = await self.run(crash=(point, occurrence))
                if not fired:
                    break
                problems = clean.diff(outcome)
                if problems:
                    raise AssertionError(
                        f"crash at {point!r} (occurrence {occurrence}) changed the outcome:\n  "
                        + "\n  ".join(problems)
                    )
                occurrence += 1
            report.crashes[point] = occurrence
        return report

    async def run(self, crash: tuple[str, int] | None = None) -> tuple[Outcome, bool]:
        """One run; with ``crash=(point, n)`` the worker dies the n-th time it reaches point."""
        if self.reset is not None:
            self.reset()
        clock = VirtualClock()
        seen = dict.fromkeys(CRASH_POINTS, 0)
        fired = False

        def hook(point: str, agent_id: str, step: int) -> None:
            nonlocal fired
            if crash is None or fired or point != crash[0]:
                return
            if seen[point] == crash[1]:
                fired = True
                raise SimulatedCrash(f"{point} of {agent_id} step {step}")
            seen[point] += 1

        store = _CrashingStore(clock, hook)
        bus = _CrashingBus(clock, hook)
        engine = await self._worker(store, bus, "worker-1")
        for agent_id, context in self.agents.items():
            await engine.trigger_agent(agent_id, self.start, dict(context)
                                       if isinstance(context, Mapping) else context)
        for _ in range(self.max_deliveries):
            delivery = bus.next_delivery()
            if delivery is None:
                if await self._all_final(store):
                    return await self._outcome(store), fired
                if await engine.wake_once():  # parked agents that are due: timers, joins
                    continue
                # Nothing queued or due and agents unfinished: time passes (timers come due)
                # and the reconciler runs. An agent waiting for a signal never finishes here.
                clock.advance(engine.stall_after + self.lease_seconds)
                await engine.sweep_once()
                continue
            bus.stepping = True
            try:
                await engine._handle(delivery)
            except SimulatedCrash:
                # The process is gone: its delivery stays unsettled and its lease held.
                engine = await self._worker(store, bus, "worker-2")
                clock.advance(max(self.lease_seconds, engine.outbox_grace) + 1)
                bus.redeliver()
                await engine.sweep_once()
            finally:
                bus.stepping = False
        raise AssertionError(f"agents unfinished after {self.max_deliveries} deliveries")

    async def _worker(self, store: InMemoryPersistence, bus: VirtualTimeBus,
                      owner: str) -> Engine:
        engine = Engine(store, bus, graphs=[self.start], owner=owner,
                        lease_seconds=self.lease_seconds)
        await engine.start()
        return engine

    async def _all_final(self, store: InMemoryPersistence) -> bool:
        return all(rec.status.is_final for rec in store.agents.values())

    async def _outcome(self, store: InMemoryPersistence) -> Outcome:
        agents = {}
        history = {}
        for agent_id, rec in sorted(store.agents.items()):
            agents[agent_id] = (rec.status.value, rec.node, rec.step,
                                json.dumps(rec.context, sort_keys=True))
            history[agent_id] = [(h.step, h.from_node, h.to_node)
                                 for h in await store.get_history(agent_id)]
        return Outcome(agents, history)
