"""The engine's protocol on the in-memory and SQLite stores (in-memory bus)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from commandnet import (
    AgentStatus,
    ContextValidationError,
    Engine,
    ErrorInfo,
    Node,
    Observer,
    RetryPolicy,
    StatusInfo,
    TransitionInfo,
    TriggerConflictError,
)
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.messages import StepEvent
from commandnet.persistence import Persistence
from commandnet.records import NewAgent

FAST = RetryPolicy(max_attempts=3, initial_interval=0.01, jitter=0, timeout=5)


class Ctx(BaseModel):
    query: str = "ok"
    hits: int = Field(default=0, ge=0)


class Done(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> None:
        ctx.hits += 1


class Start(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> type[Done]:
        ctx.hits += 1
        return Done


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Persistence]:
    if request.param == "memory":
        store = InMemoryPersistence()
        return lambda: store
    return lambda: SQLitePersistence(tmp_path / "agents.db")


@pytest.fixture
async def engine(make_store: Callable[[], Persistence]) -> AsyncIterator[Engine]:
    eng = Engine(make_store(), InMemoryEventBus(), lease_seconds=5)
    await eng.start_worker()
    yield eng
    await eng.stop(grace=1)


async def test_runs_to_terminal_and_keeps_history(engine: Engine) -> None:
    assert await engine.trigger_agent("a1", Start, Ctx(query="q"))
    rec = await engine.wait_for("a1", timeout=10)
    assert (rec.status, rec.node, rec.step, rec.context) == (
        AgentStatus.SUCCEEDED, "Done", 2, {"query": "q", "hits": 2})
    history = await engine.get_history("a1")
    assert [(h.step, h.from_node, h.to_node) for h in history] == [
        (1, "Start", "Done"), (2, "Done", None)]


async def test_trigger_is_idempotent_and_conflicts_are_clear(engine: Engine) -> None:
    assert await engine.trigger_agent("a1", Start, {"query": "q"}) is True
    assert await engine.trigger_agent("a1", "Start", Ctx(query="q")) is False
    with pytest.raises(TriggerConflictError, match=r'"q".*"other"'):
        await engine.trigger_agent("a1", Start, {"query": "other"})
    with pytest.raises(TriggerConflictError, match="'Done'"):
        await engine.trigger_agent("a1", Done, {"query": "q"})
    await engine.wait_for("a1", timeout=10)
    assert len(await engine.get_history("a1")) == 2


async def test_trigger_by_name_with_dict_and_bad_context(engine: Engine) -> None:
    engine.register(Start)
    await engine.trigger_agent("by-name", "Start", {"query": "x"})
    assert (await engine.wait_for("by-name", timeout=10)).status is AgentStatus.SUCCEEDED
    with pytest.raises(ContextValidationError, match="hits"):
        await engine.trigger_agent("bad", "Start", {"hits": -1})


class Sneaky(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> type[Done]:
        return Start  # type: ignore[return-value]


class Corrupt(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> None:
        ctx.hits = -5  # pydantic does not validate assignment; the engine validates the result


async def test_undeclared_transition_and_invalid_context_fail_the_agent(engine: Engine) -> None:
    await engine.trigger_agent("sneaky", Sneaky, Ctx())
    await engine.trigger_agent("corrupt", Corrupt, Ctx())
    await engine.trigger_agent("fine", Start, Ctx())
    sneaky = await engine.wait_for("sneaky", timeout=10)
    assert sneaky.status is AgentStatus.FAILED and sneaky.attempts == 1
    assert "'Sneaky' returned Start" in (sneaky.error or "")
    assert "declared: Done" in (sneaky.error or "")
    corrupt = await engine.wait_for("corrupt", timeout=10)
    assert corrupt.status is AgentStatus.FAILED
    assert "returned by node 'Corrupt'" in (corrupt.error or "") and "hits" in (corrupt.error or "")
    assert (await engine.wait_for("fine", timeout=10)).status is AgentStatus.SUCCEEDED


async def test_a_step_at_a_removed_node_waits_node_grace_then_fails_naming_it(
        engine: Engine) -> None:
    engine.register(Start)
    engine.node_grace = 1.0
    store = engine.persistence
    await store.create_agent(NewAgent("ghost", "RemovedNode", {"query": "q"},
                                      graph_version="0" * 64))
    await engine.bus.publish(StepEvent(agent_id="ghost", step=0))
    await asyncio.sleep(0.3)
    waiting = await store.get_agent("ghost")  # handed back: no lease held, no attempt used
    assert waiting is not None and waiting.status is AgentStatus.RUNNING
    assert (waiting.lease_owner, waiting.attempts) == (None, 0)
    rec = await engine.wait_for("ghost", timeout=20)
    assert rec.status is AgentStatus.FAILED
    assert (rec.error or "").startswith("node 'RemovedNode' was removed: agent 'ghost'")
    assert "0" * 12 in (rec.error or "")


async def test_stored_context_that_no_longer_validates(engine: Engine) -> None:
    engine.register(Start)
    await engine.persistence.create_agent(NewAgent("old", "Start", {"query": 5}))
    await engine.bus.publish(StepEvent(agent_id="old", step=0))
    rec = await engine.wait_for("old", timeout=10)
    assert rec.status is AgentStatus.FAILED and "stored context" in (rec.error or "")


CALLS: dict[str, int] = {}


class Flaky(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> None:
        CALLS[ctx.query] = CALLS.get(ctx.query, 0) + 1
        if CALLS[ctx.query] < 3:
            raise ConnectionError(f"try {CALLS[ctx.query]}")


class AlwaysFails(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> None:
        raise ValueError("boom")


class Fatal(Node[Ctx], retry=RetryPolicy(max_attempts=5, initial_interval=0.01,
                                         non_retryable=(KeyError,))):
    async def run(self, ctx: Ctx) -> None:
        raise KeyError("no such account")


class Slow(Node[Ctx], retry=RetryPolicy(max_attempts=2, initial_interval=0.01, timeout=0.05)):
    async def run(self, ctx: Ctx) -> None:
        await asyncio.sleep(10)


async def test_retry_policy(engine: Engine) -> None:
    CALLS.clear()
    await engine.trigger_agent("flaky", Flaky, Ctx(query="flaky"))
    await engine.trigger_agent("always", AlwaysFails, Ctx())
    await engine.trigger_agent("fatal", Fatal, Ctx())
    await engine.trigger_agent("slow", Slow, Ctx())
    flaky = await engine.wait_for("flaky", timeout=10)
    assert flaky.status is AgentStatus.SUCCEEDED and CALLS["flaky"] == 3
    assert (await engine.get_history("flaky"))[0].attempts == 3
    always = await engine.wait_for("always", timeout=10)
    assert always.status is AgentStatus.FAILED and always.attempts == 3
    assert "ValueError: boom" in (always.error or "")
    fatal = await engine.wait_for("fatal", timeout=10)
    assert fatal.status is AgentStatus.FAILED and fatal.attempts == 1
    slow = await engine.wait_for("slow", timeout=10)
    assert slow.status is AgentStatus.FAILED and slow.attempts == 2
    assert "timed out after 0.05s" in (slow.error or "")


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_interval=1, multiplier=3, max_interval=5, jitter=0.1)
    for attempt, base in ((1, 1.0), (2, 3.0), (3, 5.0), (5, 5.0)):  # 1, 3, 9 -> 5, 81 -> 5
        values = [policy.backoff(attempt) for _ in range(200)]
        assert all(abs(v - base) <= 0.1 * base + 1e-9 for v in values), (attempt, values)
        assert len(set(values)) > 100, f"attempt {attempt}: backoffs are not spread: {values}"
        # Spread on both sides of the base, over most of the +/-10 % band.
        assert min(values) < base < max(values), (attempt, min(values), max(values))
        assert max(values) - min(values) > 0.1 * base, (attempt, min(values), max(values))
    exact = RetryPolicy(initial_interval=1, multiplier=3, max_interval=5, jitter=0)
    assert [exact.backoff(attempt) for attempt in (1, 2, 3, 5)] == [1.0, 3.0, 5.0, 5.0]
    assert {exact.backoff(2) for _ in range(50)} == {3.0}
    assert RetryPolicy(jitter=0).backoff(2) == 2.0


GATE: asyncio.Event | None = None


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until true; fail naming ``what`` after ``timeout`` (a bound of its own)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


class Blocked(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> type[Done]:
        assert GATE is not None
        await GATE.wait()
        return Done


async def test_cancel_discards_the_in_flight_result(engine: Engine) -> None:
    global GATE
    GATE = asyncio.Event()
    await engine.trigger_agent("c1", Blocked, Ctx())
    await until(lambda: engine.in_flight > 0, "the Blocked step of c1 to start running")
    assert await engine.cancel_agent("c1", "user asked")
    GATE.set()
    rec = await engine.wait_for("c1", timeout=10)
    await until(lambda: engine.in_flight == 0, "the discarded step of c1 to finish")
    rec = await engine.get_agent("c1")
    assert (rec.status, rec.step, rec.error) == (AgentStatus.CANCELLED, 0, "user asked")
    assert await engine.get_history("c1") == []
    assert not await engine.cancel_agent("c1")


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def on_step(self, info: TransitionInfo) -> None:
        self.events.append(("t", info.from_node, info.to_node, info.step))

    async def on_step_error(self, info: ErrorInfo) -> None:
        self.events.append(("e", info.node, info.attempt, info.final))

    async def on_status(self, info: StatusInfo) -> None:
        self.events.append(("s", info.status.value, info.node, info.step))


class Broken(Observer):
    async def on_status(self, info: StatusInfo) -> None:
        raise RuntimeError("observer bug")


async def test_observers_are_called_and_cannot_break_the_engine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="commandnet")
    rec = Recorder()
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), observers=[Broken(), rec])
    await engine.start_worker()
    CALLS.clear()
    await engine.trigger_agent("o1", Start, Ctx())
    await engine.trigger_agent("o2", AlwaysFails, Ctx())
    await engine.wait_for("o1", timeout=10)
    await engine.wait_for("o2", timeout=10)
    await engine.stop()
    o1 = [e for e in rec.events if (e[0] == "t" and e[1] in {"Start", "Done"})
          or (e[0] == "s" and e[2] in {"Start", "Done"})]
    assert o1 == [
        ("s", "running", "Start", 0), ("t", "Start", "Done", 1), ("s", "running", "Done", 1),
        ("t", "Done", None, 2), ("s", "succeeded", "Done", 2)]
    assert ("e", "AlwaysFails", 1, False) in rec.events
    assert ("e", "AlwaysFails", 3, True) in rec.events
    assert ("s", "failed", "AlwaysFails", 0) in rec.events
    # Broken raised at every status: each failure is logged (with its exception), then ignored.
    failures = [r for r in caplog.records if "observer" in r.getMessage()
                and "fail" in r.getMessage() and r.exc_info is not None]
    assert failures, [r.getMessage() for r in caplog.records]
    assert all(r.levelno >= logging.ERROR for r in failures)
    assert all(isinstance(r.exc_info[1], RuntimeError) and str(r.exc_info[1]) == "observer bug"
               for r in failures if r.exc_info is not None)
    assert len(failures) == len([e for e in rec.events if e[0] == "s"]), (
        [r.getMessage() for r in failures], rec.events)


async def test_observers_added_or_removed_while_running_are_honoured() -> None:
    """The engine caches each hook's observers: the cache must follow ``engine.observers``."""
    first, second = Recorder(), Recorder()
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), observers=[first])
    await engine.start_worker()
    await engine.trigger_agent("before", Start, Ctx())
    await engine.wait_for("before", timeout=10)
    engine.observers.append(second)
    await engine.trigger_agent("during", Start, Ctx())
    await engine.wait_for("during", timeout=10)
    engine.observers.remove(first)
    await engine.trigger_agent("after", Start, Ctx())
    await engine.wait_for("after", timeout=10)
    await engine.stop()
    done = [("t", "Start", "Done", 1), ("t", "Done", None, 2)]
    assert [e for e in first.events if e[0] == "t"] == done * 2
    assert [e for e in second.events if e[0] == "t"] == done * 2


async def test_poison_messages_are_dead_lettered_and_work_goes_on() -> None:
    bus = InMemoryEventBus()
    engine = Engine(InMemoryPersistence(), bus)
    await engine.start_worker()
    await bus.publish_raw(b"\xff not json")
    await bus.publish_raw(json.dumps({"kind": "step", "agent_id": "x"}).encode())
    await bus.publish_raw(json.dumps({"kind": "launch-missiles"}).encode())
    await engine.trigger_agent("good", Start, Ctx())
    assert (await engine.wait_for("good", timeout=10)).status is AgentStatus.SUCCEEDED
    await engine.stop()
    reasons = [reason for _, reason in bus.dead_letters]
    assert len(reasons) == 3
    assert all(r.startswith("malformed message") for r in reasons)
    assert "step" in reasons[1] and "launch-missiles" in reasons[2]


async def test_trigger_command_from_a_process_without_the_graph() -> None:
    store, bus = InMemoryPersistence(), InMemoryEventBus()
    worker = Engine(store, bus, graphs=[Start])
    await worker.start_worker()
    outsider = Engine(store, bus)  # knows no graph, like the operator
    await outsider.trigger_agent("remote", "Start", {"query": "from-cr"})
    await outsider.trigger_agent("typo", "Strat", {"query": "x"})
    await outsider.trigger_agent("invalid", "Start", {"hits": "many"})
    ok = await outsider.wait_for("remote", timeout=10)
    assert ok.status is AgentStatus.SUCCEEDED and ok.context["query"] == "from-cr"
    typo = await outsider.wait_for("typo", timeout=10)
    assert typo.status is AgentStatus.FAILED and "unknown node 'Strat'" in (typo.error or "")
    invalid = await outsider.wait_for("invalid", timeout=10)
    assert invalid.status is AgentStatus.FAILED and "hits" in (invalid.error or "")
    await worker.stop()


async def test_busy_lease_is_retried_not_run_twice() -> None:
    store, bus = InMemoryPersistence(), InMemoryEventBus()
    engine = Engine(store, bus, graphs=[Start], lease_seconds=0.3)
    await engine.start()
    await store.create_agent(NewAgent("held", "Start", {"query": "q"}))
    lease = await store.load_and_lock_agent("held", 0, "dead-worker", 0.3)
    assert lease.record is not None
    await engine.start_worker()
    await bus.publish(StepEvent(agent_id="held", step=0))
    rec = await engine.wait_for("held", timeout=10)
    assert rec.status is AgentStatus.SUCCEEDED and rec.step == 2
    assert [h.step for h in await engine.get_history("held")] == [1, 2]
    await engine.stop()


async def test_lost_publish_is_repaired_by_the_sweeper() -> None:
    store, bus = InMemoryPersistence(), InMemoryEventBus()
    engine = Engine(store, bus, graphs=[Start], sweep_interval=0.05, outbox_grace=0.0)
    await engine.start_worker()
    await store.create_agent(NewAgent("lost", "Start", {"query": "q"}))  # event never published
    rec = await engine.wait_for("lost", timeout=10)
    assert rec.status is AgentStatus.SUCCEEDED
    await engine.stop()


async def test_draining_keeps_the_leases_of_finishing_steps_alive() -> None:
    global GATE
    GATE = asyncio.Event()
    store = InMemoryPersistence()
    engine = Engine(store, InMemoryEventBus(), graphs=[Blocked], lease_seconds=0.3)
    await engine.start_worker()
    await engine.trigger_agent("drain", Blocked, Ctx())
    await until(lambda: engine.in_flight > 0, "the Blocked step of 'drain' to start running")
    stopping = asyncio.create_task(engine.stop(grace=10))
    await asyncio.sleep(1.0)  # more than three lease lengths into the drain
    held = store.agents["drain"]
    assert held.lease_owner == engine.owner
    assert held.lease_until is not None and held.lease_until > store.clock()
    GATE.set()
    await stopping
    rec = store.agents["drain"]
    assert (rec.node, rec.step) == ("Done", 1)  # committed by the draining worker, once
