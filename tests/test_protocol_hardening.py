"""Regression tests of issue 7's protocol defects, in one process (in-memory and SQLite).

Each test failed on the code before the fix; the real-process and real-server versions live in
test_pools.py, test_poison_step.py, test_status_resync.py and the store contract.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from commandnet import (
    AgentStatus,
    Engine,
    Node,
    Observer,
    RetryPolicy,
    StoreUnavailableError,
)
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.examples.linear import Start as Step0
from commandnet.messages import CancelCommand, StepEvent, TriggerCommand
from commandnet.persistence import Persistence
from commandnet.records import Commit, LeaseState, NewAgent

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0, timeout=5)


class Ledger(BaseModel):
    entries: list[str] = []


class Settle(Node[Ledger], retry=FAST):
    async def run(self, ctx: Ledger) -> None:
        ctx.entries.append("settle")


class Book(Node[Ledger], retry=FAST):
    async def run(self, ctx: Ledger) -> type[Settle]:
        ctx.entries.append("book")
        return Settle


async def eventually(check: Callable[[], Awaitable[bool]], what: str, limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not await check():
            await asyncio.sleep(0.02)
    assert await check(), what


@pytest.fixture
async def engines() -> AsyncIterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for engine in made:
        await engine.stop(grace=1.0)


def engine_for(made: list[Engine], store: Persistence, pool: str, graph: Any,
               **options: Any) -> Engine:
    engine = Engine(store, InMemoryEventBus(pool=pool), graphs=[graph], **options)
    made.append(engine)
    return engine


# ---------------------------------------------------------------- 1. pools stay apart


async def test_a_pool_never_repairs_or_fails_another_pools_agents(engines: list[Engine]) -> None:
    store = InMemoryPersistence()
    repair = {"outbox_grace": 0.0, "stall_after": 0.0, "sweep_interval": 3600.0}
    chain = engine_for(engines, store, "chain", Step0, **repair)
    ledger = engine_for(engines, store, "ledger", Book, **repair)
    await ledger.start()  # triggers, but consumes nothing yet: its events wait in the outbox
    for i in range(5):
        assert await ledger.trigger_agent(f"l{i}", Book, {})
    await store.clear_outbox(await store.pending_outbox(0.0, 100))  # ...or they were lost
    await chain.start_worker()
    await chain.sweep_once()
    # A step of the ledger pool reaching the chain pool's worker is left alone.
    await chain.bus.publish(StepEvent(agent_id="l0", step=0, redo=7))
    await asyncio.sleep(0.2)
    for i in range(5):
        rec = await store.get_agent(f"l{i}")
        assert rec is not None and (rec.status, rec.pool, rec.attempts) == (
            AgentStatus.RUNNING, "ledger", 0), rec
    lease = await store.load_and_lock_agent("l1", 0, "x", 1.0, "chain")
    assert lease.state is LeaseState.FOREIGN
    await ledger.start_worker()
    await ledger.sweep_once()  # its own sweeper re-publishes its own agents
    for i in range(5):
        rec = await ledger.wait_for(f"l{i}", timeout=10)
        assert (rec.status, rec.node, rec.context["entries"]) == (
            AgentStatus.SUCCEEDED, "Settle", ["book", "settle"])


# ---------------------------------------------------------------- 3. no reconciler storm


async def test_the_reconciler_resends_a_stalled_agent_once_per_period(
        engines: list[Engine]) -> None:
    store = InMemoryPersistence()
    engine = engine_for(engines, store, "default", Book, stall_after=0.5,
                        sweep_interval=3600.0)
    await engine.start()
    for i in range(3):
        await engine.trigger_agent(f"q{i}", Book, {})
    bus = engine.bus
    assert isinstance(bus, InMemoryEventBus)
    await asyncio.sleep(0.6)
    sent = bus.published
    for _ in range(5):
        await engine.sweep_once()
    assert bus.published - sent == 3  # not 15: each re-send is recorded


async def test_one_sweep_is_bounded_and_one_worker_of_a_pool_sweeps(
        engines: list[Engine]) -> None:
    store = InMemoryPersistence()
    first = engine_for(engines, store, "default", Book, stall_after=0.0, reconcile_batch=40,
                       sweep_interval=3600.0)
    second = engine_for(engines, store, "default", Book, stall_after=0.0, reconcile_batch=40,
                        sweep_interval=3600.0)
    for i in range(100):
        assert await store.create_agent(NewAgent(f"s{i}", "Book", {}))
    await store.clear_outbox(await store.pending_outbox(0.0, 1000))
    assert await first.sweep_once() == 40
    assert await second.sweep_once() == 0  # the first holds the pool's repair turn
    assert await first.sweep_once() == 40


# ---------------------------------------------------------------- 4. early cancels


async def test_a_cancel_that_overtakes_its_trigger_wins(engines: list[Engine]) -> None:
    ran: list[str] = []

    class Watched(Node[Ledger], retry=FAST):
        async def run(self, ctx: Ledger) -> None:
            ran.append("ran")

    store = InMemoryPersistence()
    engine = engine_for(engines, store, "default", Watched)
    await engine.start_worker()
    bus = engine.bus
    # Commands of different workers overtake each other: the cancel lands first.
    await bus.publish(CancelCommand(agent_id="quick", reason="deleted at once"))
    await eventually(lambda: _status_is(store, "quick", AgentStatus.CANCELLED), "the tombstone")
    await bus.publish(TriggerCommand(agent_id="quick", start_node="Watched", context={}))
    await bus.publish(CancelCommand(agent_id="quick", reason="deleted again"))
    await asyncio.sleep(0.3)
    rec = await engine.wait_for("quick", timeout=5)
    assert (rec.status, rec.start_node, rec.error) == (
        AgentStatus.CANCELLED, "Watched", "deleted at once")
    assert ran == []


def test_repeated_cancels_are_not_one_message() -> None:
    one, two = CancelCommand(agent_id="a"), CancelCommand(agent_id="a")
    assert one.dedup_id != two.dedup_id
    assert one.dedup_id == CancelCommand.model_validate_json(one.model_dump_json()).dedup_id


async def _status_is(store: Persistence, agent_id: str, status: AgentStatus) -> bool:
    rec = await store.get_agent(agent_id)
    return rec is not None and rec.status is status


# ---------------------------------------------------------------- 5. forgotten leases


class ForgetfulStore(InMemoryPersistence):
    """Forgets the first lease before its commit, as a PostgreSQL crash may (no flush)."""

    forgotten: list[int]

    async def save_state(self, commit: Commit) -> bool:
        if not self.forgotten:
            self.forgotten.append(commit.step)
            rec = self.agents[commit.agent_id]
            self.agents[commit.agent_id] = replace(rec, lease_owner=None, lease_until=None)
        return await super().save_state(commit)


async def test_a_lease_the_store_forgot_is_retried_not_dropped(engines: list[Engine]) -> None:
    store = ForgetfulStore()
    store.forgotten = []
    engine = engine_for(engines, store, "default", Book, stall_after=300.0)
    await engine.start_worker()
    await engine.trigger_agent("f1", Book, {})
    rec = await engine.wait_for("f1", timeout=10)  # not stall_after (300 s)
    assert (rec.status, store.forgotten) == (AgentStatus.SUCCEEDED, [0])
    assert [(h.step, h.from_node) for h in await engine.get_history("f1")] == [
        (1, "Book"), (2, "Settle")]


# ---------------------------------------------------------------- 7. bounded bookkeeping


class Count(BaseModel):
    n: int = 0


class Last(Node[Count], retry=FAST):
    async def run(self, ctx: Count) -> None:
        await asyncio.sleep(random.choice((0, 0, 0.002)))


class Loop(Node[Count], retry=FAST):
    async def run(self, ctx: Count) -> type[Loop] | type[Last]:
        await asyncio.sleep(random.choice((0, 0, 0.002)))
        ctx.n += 1
        return Loop if ctx.n < 9 else Last


async def test_ten_thousand_steps_leave_no_bookkeeping_and_no_false_alarms(
        caplog: pytest.LogCaptureFixture, engines: list[Engine]) -> None:
    store = InMemoryPersistence()
    engine = engine_for(engines, store, "default", Loop, lease_seconds=0.15,
                        max_in_flight=128)
    caplog.set_level(logging.INFO, logger="commandnet")
    await engine.start_worker()
    for i in range(1000):
        await engine.trigger_agent(f"b{i}", Loop, {})
    for i in range(1000):
        assert (await engine.wait_for(f"b{i}", timeout=120)).status is AgentStatus.SUCCEEDED
    steps = sum(len(store.history[f"b{i}"]) for i in range(1000))
    assert steps == 10_000
    await asyncio.sleep(0.1)
    assert (engine._running, engine._tasks) == (set(), set())
    noise = [r.getMessage() for r in caplog.records
             if "lease extension failed" in r.getMessage() or "lease lost" in r.getMessage()]
    assert noise == []


async def test_two_copies_of_one_step_on_one_worker_are_tracked_apart(
        engines: list[Engine]) -> None:
    gate = asyncio.Event()
    started = 0

    class Held(Node[Ledger], retry=FAST):
        async def run(self, ctx: Ledger) -> None:
            nonlocal started
            started += 1
            await gate.wait()

    store = InMemoryPersistence()
    engine = engine_for(engines, store, "default", Held, lease_seconds=30.0)
    await engine.start_worker()
    await engine.trigger_agent("twice", Held, {})
    await eventually(lambda: _true(started == 1), "the first copy to start")
    rec = store.agents["twice"]  # its lease ran out (a stalled heartbeat): a copy may start
    store.agents["twice"] = replace(rec, lease_until=0.0)
    await engine.bus.publish(StepEvent(agent_id="twice", step=0, redo=1))
    await eventually(lambda: _true(started == 2), "the second copy to start")
    assert len(engine._running) == 2  # both tracked, neither overwrites the other
    gate.set()
    assert (await engine.wait_for("twice", timeout=5)).status is AgentStatus.SUCCEEDED
    await eventually(lambda: _true(not engine._running and not engine._tasks),
                     "the engine's bookkeeping to empty")
    assert len(store.history["twice"]) == 1  # the second commit was refused


async def _true(value: bool) -> bool:
    return value


# ---------------------------------------------------------------- 9. SQLite locks and clocks


async def test_a_sqlite_lock_timeout_is_retried_not_dead_lettered(tmp_path: Path,
                                                                  engines: list[Engine]) -> None:
    path = tmp_path / "locked.db"
    store = SQLitePersistence(path, lock_timeout=0.2)
    engine = engine_for(engines, store, "default", Book, sweep_interval=3600.0)
    await engine.start_worker()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    with pytest.raises(StoreUnavailableError, match="stayed locked"):
        await store.cancel_agent("x", "y")
    bus = engine.bus
    assert isinstance(bus, InMemoryEventBus)
    await bus.publish(TriggerCommand(agent_id="late", start_node="Book", context={}))
    await asyncio.sleep(0.6)  # several lock timeouts while the trigger is handled
    blocker.execute("COMMIT")
    blocker.close()
    rec = await engine.wait_for("late", timeout=15)
    assert rec.status is AgentStatus.SUCCEEDED
    assert bus.dead_letters == []


async def test_a_sqlite_lease_granted_after_a_wait_lasts_its_full_length(
        tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "clock.db"
    store = SQLitePersistence(path, clock=lambda: now[0])
    await store.setup()
    try:
        assert await store.create_agent(NewAgent("a", "Book", {}))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        waiting = asyncio.create_task(store.load_and_lock_agent("a", 0, "w", 60.0))
        await asyncio.sleep(0.2)
        now[0] += 30.0  # the wait for the lock took 30 s
        blocker.execute("COMMIT")
        blocker.close()
        lease = await waiting
        assert lease.record is not None and lease.record.lease_until == 1090.0
    finally:
        await store.close()


# ---------------------------------------------------------------- 14. the seed's observer


async def test_an_observer_written_for_the_seed_readme_works(engines: list[Engine]) -> None:
    calls: list[tuple[Any, ...]] = []
    flaky = {"left": 1}

    class SeedObserver(Observer):
        async def on_transition(self, agent_id, from_node, to_node, duration_ms):  # type: ignore[no-untyped-def]
            calls.append(("t", agent_id, from_node, to_node, duration_ms >= 0))

        async def on_error(self, agent_id, node, error):  # type: ignore[no-untyped-def]
            calls.append(("e", agent_id, node, str(error)))

    class Flaky(Node[Ledger], retry=FAST):
        async def run(self, ctx: Ledger) -> type[Settle]:
            if flaky["left"]:
                flaky["left"] -= 1
                raise RuntimeError("card declined")
            return Settle

    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), observer=SeedObserver())
    engines.append(engine)
    await engine.start_worker()
    await engine.trigger_agent("seed", Flaky, {})
    assert (await engine.wait_for("seed", timeout=5)).status is AgentStatus.SUCCEEDED
    assert calls == [("e", "seed", "Flaky", "card declined"),
                     ("t", "seed", "Flaky", "Settle", True),
                     ("t", "seed", "Settle", None, True)]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_forgotten_lease_is_retried_on_real_stores(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest,
        engines: list[Engine]) -> None:
    """As above, with the lease wiped by SQL in the store itself before the first commit."""
    forgotten: list[int] = []
    store: Persistence
    if kind == "sqlite":
        class ForgetfulSQLite(SQLitePersistence):
            async def save_state(self, commit: Commit) -> bool:
                if not forgotten:
                    forgotten.append(commit.step)
                    self.db.execute("UPDATE agents SET lease_owner = NULL, lease_until = NULL "
                                    "WHERE agent_id = ?", (commit.agent_id,))
                return await super().save_state(commit)

        store = ForgetfulSQLite(tmp_path / "forget.db")
    else:
        from commandnet.adapters.postgres import PostgresPersistence

        class ForgetfulPostgres(PostgresPersistence):
            async def save_state(self, commit: Commit) -> bool:
                if not forgotten:
                    forgotten.append(commit.step)
                    await self.pool.execute("UPDATE agents SET lease_owner = NULL, "
                                            "lease_until = NULL WHERE agent_id = $1",
                                            commit.agent_id)
                return await super().save_state(commit)

        store = ForgetfulPostgres(request.getfixturevalue("postgres_dsn"), min_size=1,
                                  max_size=4)
    engine = engine_for(engines, store, "default", Book, stall_after=300.0)
    await engine.start_worker()
    await engine.trigger_agent("f2", Book, {})
    rec = await engine.wait_for("f2", timeout=10)
    assert (rec.status, forgotten) == (AgentStatus.SUCCEEDED, [0])
    assert [h.step for h in await engine.get_history("f2")] == [1, 2]


# ------------------------------------------- 2. a suspect step on an idle worker runs alone

RUNS: list[tuple[str, str]] = []


class Timed(Node[Ledger], retry=FAST):
    async def run(self, ctx: Ledger) -> None:
        RUNS.append((ctx.entries[0], "start"))
        await asyncio.sleep(0.1)
        RUNS.append((ctx.entries[0], "end"))


async def test_a_suspect_step_runs_alone_even_while_its_lease_is_in_flight(
        engines: list[Engine]) -> None:
    """The gate shuts as an idle worker starts a lease, not when the lease comes back: a step
    fetched meanwhile must not run beside a suspect whose worker may die (CI saw a bystander
    counted 8 deaths that way)."""
    RUNS.clear()
    store = InMemoryPersistence()
    engine = engine_for(engines, store, "default", Timed, lease_seconds=5)
    await engine.trigger_agent("suspect", Timed, Ledger(entries=["suspect"]))
    # A worker took the step and died: its lease is never settled, so the step is a suspect.
    lease = await store.load_and_lock_agent("suspect", 0, "dead", 0.05, "default", True)
    assert lease.state is LeaseState.GRANTED
    await asyncio.sleep(0.1)
    await engine.trigger_agent("bystander", Timed, Ledger(entries=["bystander"]))
    real = store.load_and_lock_agent

    async def slow_lease(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)  # a store round trip, during which the next step arrives
        return await real(*args, **kwargs)

    store.load_and_lock_agent = slow_lease  # type: ignore[method-assign]
    await engine.start_worker()
    for agent in ("suspect", "bystander"):
        assert (await engine.wait_for(agent, timeout=10)).status is AgentStatus.SUCCEEDED
    assert RUNS == [("suspect", "start"), ("suspect", "end"), ("bystander", "start"),
                    ("bystander", "end")], RUNS
