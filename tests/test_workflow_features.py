"""Workflow features through the engine: payloads, durable timers, signals (kept, duplicated,
timed out), resume from a chosen node, and cancelling parked agents; on the in-memory store and
on SQLite (where a parked agent outlives its worker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from commandnet import (
    AgentNotFoundError,
    AgentStatus,
    CommandNetError,
    ContextValidationError,
    Engine,
    GraphAnalyzer,
    SignalOutcome,
    UnknownNodeError,
)
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.observer import Observer, StatusInfo
from commandnet.persistence import Persistence
from tests.graphs.waiting import Approval, Ask, Charge, Nap, Split, TakeOrder, Wrong

FAST = {"wake_interval": 0.05, "sweep_interval": 0.2}


def make_store(kind: str, tmp_path: Path) -> Persistence:
    return InMemoryPersistence() if kind == "memory" else SQLitePersistence(tmp_path / "w.db")


@pytest.fixture(params=["memory", "sqlite"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    eng = Engine(make_store(request.param, tmp_path), InMemoryEventBus(),
                 graphs=[Nap, TakeOrder, Split], **FAST)  # type: ignore[arg-type]
    await eng.start_worker()
    try:
        yield eng
    finally:
        await eng.stop(grace=2)


async def parked(engine: Engine, agent_id: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not (await engine.get_agent(agent_id)).parked:
            await asyncio.sleep(0.02)


def kinds(history: list) -> list[tuple[str, str | None, str]]:  # type: ignore[type-arg]
    return [(h.from_node, h.to_node, h.kind) for h in history]


async def test_a_timer_parks_the_agent_holding_no_message_then_runs_on(engine: Engine) -> None:
    await engine.trigger_agent("t1", Nap, {"sleep_for": 0.5})
    await parked(engine, "t1")
    rec = await engine.get_agent("t1")
    assert (rec.node, rec.step, rec.waiting) == ("Woke", 1, None) and rec.wake_at is not None
    assert engine.in_flight == 0  # no worker slot
    assert engine.bus._queue.empty() and not engine.bus._inflight  # type: ignore[attr-defined]
    done = await engine.wait_for("t1", timeout=10)
    assert done.status is AgentStatus.SUCCEEDED and done.context["log"] == ["nap", "woke"]
    assert kinds(await engine.get_history("t1")) == [("Nap", "Woke", "step"),
                                                     ("Woke", None, "step")]


async def test_a_signal_carries_a_typed_payload_into_the_waiting_node(engine: Engine) -> None:
    await engine.trigger_agent("s1", Ask, {})
    await parked(engine, "s1")
    assert (await engine.get_agent("s1")).waiting == "approval"
    outcome = await engine.signal("s1", "approval", Approval(by="ana"), signal_id="sig-1")
    assert outcome is SignalOutcome.DELIVERED
    assert await engine.signal("s1", "approval", {"by": "bob"}, signal_id="sig-1") \
        is SignalOutcome.DUPLICATE  # the same signal sent twice is applied once
    done = await engine.wait_for("s1", timeout=10)
    assert done.status is AgentStatus.SUCCEEDED
    assert done.context["log"] == ["ask", "approved:ana"] and done.context["approved_by"] == "ana"


async def test_a_signal_sent_before_the_wait_is_kept(engine: Engine) -> None:
    await engine.trigger_agent("early", TakeOrder, {}, payload={"amount": 0})
    assert await engine.signal("early", "approval", {"by": "eve"}) in (
        SignalOutcome.KEPT, SignalOutcome.DELIVERED)
    done = await engine.wait_for("early", timeout=10)
    assert done.context["log"] == ["order:0", "ask", "approved:eve"]


async def test_a_wait_that_runs_out_moves_to_the_timeout_node(engine: Engine) -> None:
    await engine.trigger_agent("late", Ask, {"timeout": 0.3})
    done = await engine.wait_for("late", timeout=10)
    assert done.status is AgentStatus.SUCCEEDED and done.context["log"] == ["ask", "expired"]
    assert kinds(await engine.get_history("late")) == [
        ("Ask", "Approved", "step"), ("Approved", "Expired", "timeout"),
        ("Expired", None, "step")]
    with pytest.raises(CommandNetError, match="has ended"):
        await engine.signal("late", "approval", {"by": "x"})  # too late: the agent has ended


async def test_signals_to_unknown_or_finished_agents_raise(engine: Engine) -> None:
    with pytest.raises(AgentNotFoundError, match="ghost"):
        await engine.signal("ghost", "approval", {"by": "x"})
    await engine.trigger_agent("fin", Nap, {"sleep_for": 0})
    await engine.wait_for("fin", timeout=10)
    with pytest.raises(CommandNetError, match="has ended"):
        await engine.signal("fin", "approval", {"by": "x"})


async def test_a_trigger_payload_is_validated_as_the_start_nodes_type(engine: Engine) -> None:
    with pytest.raises(ContextValidationError, match="payload of node 'TakeOrder'"):
        await engine.trigger_agent("bad", TakeOrder, {}, payload={"amount": "lots"})
    with pytest.raises(AgentNotFoundError):
        await engine.get_agent("bad")  # refused before anything was stored


async def test_a_signal_payload_that_does_not_validate_fails_the_agent_with_a_reason(
        engine: Engine) -> None:
    await engine.trigger_agent("p1", Ask, {})
    await parked(engine, "p1")
    await engine.signal("p1", "approval", {"who": "nobody"})
    done = await engine.wait_for("p1", timeout=10)
    assert done.status is AgentStatus.FAILED
    assert "payload of node 'Approved'" in (done.error or "") and "by" in (done.error or "")


async def test_a_directive_the_hint_does_not_declare_fails_the_agent(engine: Engine) -> None:
    engine.register(Wrong)
    await engine.trigger_agent("w1", Wrong, {})
    done = await engine.wait_for("w1", timeout=10)
    assert done.status is AgentStatus.FAILED and "does not declare" in (done.error or "")


async def test_cancel_reaches_parked_agents(engine: Engine) -> None:
    await engine.trigger_agent("c-timer", Nap, {"sleep_for": 0.4})
    await engine.trigger_agent("c-wait", Ask, {"timeout": 0.4})
    await parked(engine, "c-timer")
    await parked(engine, "c-wait")
    assert await engine.cancel_agent("c-timer") and await engine.cancel_agent("c-wait")
    await asyncio.sleep(0.8)  # both would have woken by now
    for agent_id in ("c-timer", "c-wait"):
        rec = await engine.get_agent(agent_id)
        assert rec.status is AgentStatus.CANCELLED and not rec.parked
        assert len(await engine.get_history(agent_id)) == 1


async def test_resume_a_failed_agent_from_a_chosen_node_with_a_context_patch(
        engine: Engine) -> None:
    await engine.trigger_agent("r1", TakeOrder, {"fail_at": "Charge"}, payload={"amount": 5})
    await parked(engine, "r1")
    await engine.signal("r1", "approval", {"by": "ana"})
    failed = await engine.wait_for("r1", timeout=10)
    assert failed.status is AgentStatus.FAILED and "card declined" in (failed.error or "")
    with pytest.raises(ContextValidationError, match="patched context"):
        await engine.resume("r1", Charge, {"amount": "many"})
    with pytest.raises(UnknownNodeError, match="Nowhere"):
        await engine.resume("r1", "Nowhere")
    assert await engine.resume("r1", Charge, {"fail_at": None, "amount": 7}) is True
    assert await engine.resume("r1", Charge) is False  # running again: nothing to resume
    done = await engine.wait_for("r1", timeout=10)
    assert done.status is AgentStatus.SUCCEEDED and done.error is None
    assert done.context["log"][-1] == "charge:7" and done.context.get("fail_at") is None
    history = kinds(await engine.get_history("r1"))
    assert history[-2:] == [("Charge", "Charge", "resume"), ("Charge", None, "step")]


async def test_resume_a_cancelled_waiting_agent_at_its_wait(engine: Engine) -> None:
    await engine.trigger_agent("r2", Ask, {})
    await parked(engine, "r2")
    await engine.cancel_agent("r2", "paused by an operator")
    assert await engine.resume("r2", Ask) is True
    await parked(engine, "r2")
    await engine.signal("r2", "approval", {"by": "carol"})
    done = await engine.wait_for("r2", timeout=10)
    assert done.context["log"] == ["ask", "ask", "approved:carol"]


async def test_a_parked_agent_outlives_its_worker(tmp_path: Path) -> None:
    """The timer is in the store: a new worker (a new process's bus) wakes it."""
    first = Engine(SQLitePersistence(tmp_path / "w.db"), InMemoryEventBus(), graphs=[Nap],
                   **FAST)  # type: ignore[arg-type]
    await first.start_worker()
    await first.trigger_agent("t-restart", Nap, {"sleep_for": 0.6})
    await parked(first, "t-restart")
    await first.stop(grace=1)
    second = Engine(SQLitePersistence(tmp_path / "w.db"), InMemoryEventBus(), graphs=[Nap],
                    **FAST)  # type: ignore[arg-type]
    await second.start_worker()
    try:
        done = await second.wait_for("t-restart", timeout=10)
        assert done.status is AgentStatus.SUCCEEDED and done.context["log"] == ["nap", "woke"]
    finally:
        await second.stop(grace=1)


def test_the_picture_shows_every_edge_kind() -> None:
    text = GraphAnalyzer.mermaid(TakeOrder)
    assert "Ask --> Approved: signal" in text and "Ask --> Expired: timeout" in text
    assert "Nap --> Woke: sleep" in GraphAnalyzer.mermaid(Nap)
    graph = GraphAnalyzer.validate(TakeOrder)
    assert graph.kinds[("Ask", "Expired")] == frozenset({"timeout"})
    assert GraphAnalyzer.build_graph(Nap) == {"Nap": ["Woke"], "Woke": []}


async def test_a_fan_out_runs_its_branches_and_joins_once_with_their_results(
        engine: Engine) -> None:
    await engine.trigger_agent("f1", Split, {"branches": 5, "policy": "collect",
                                             "fail_at": "Square3"})
    done = await engine.wait_for("f1", timeout=20)
    assert done.status is AgentStatus.SUCCEEDED, done.error
    assert done.context["amount"] == 0 + 1 + 4 + 16  # branch 3 failed, the others squared
    assert done.context["log"] == ["split", "gathered:4/5"]
    assert kinds(await engine.get_history("f1")) == [("Split", "Gather", "step"),
                                                     ("Gather", None, "step")]
    failed = await engine.get_agent("f1/1/3")
    assert failed.status is AgentStatus.FAILED and failed.parent_id == "f1"
    assert "square 3 failed" in (failed.error or "")


async def test_fail_fast_fails_the_parent_and_cancels_the_other_branches(engine: Engine) -> None:
    await engine.trigger_agent("f2", Split, {"branches": 4, "fail_at": "Square0",
                                             "step_time": 0.3})
    done = await engine.wait_for("f2", timeout=20)
    assert done.status is AgentStatus.FAILED
    assert "f2/1/0" in (done.error or "") and "square 0 failed" in (done.error or "")
    ends = {(await engine.get_agent(f"f2/1/{i}")).status for i in range(1, 4)}
    assert AgentStatus.CANCELLED in ends  # cancelled unless it had already finished
    assert len(await engine.get_history("f2")) == 1  # the join never ran


class Statuses(Observer):
    def __init__(self) -> None:
        self.seen: list[StatusInfo] = []

    async def on_status(self, info: StatusInfo) -> None:
        self.seen.append(info)


@pytest.mark.parametrize("how", ["fails", "is cancelled"])
async def test_observers_hear_of_a_parent_a_branch_failed(engine: Engine, how: str) -> None:
    statuses = Statuses()
    engine.observers.append(statuses)
    fail_at = "Square0" if how == "fails" else None
    await engine.trigger_agent("f4", Split, {"branches": 2, "fail_at": fail_at,
                                             "step_time": 0.5 if fail_at else 30})
    if fail_at is None:
        await parked(engine, "f4")
        await engine.cancel_agent("f4/1/1", "not needed")
    done = await engine.wait_for("f4", timeout=20)
    assert done.status is AgentStatus.FAILED
    assert [(s.status, s.error) for s in statuses.seen if s.agent_id == "f4"][-1] == (
        AgentStatus.FAILED, done.error)


async def test_cancelling_a_fanned_out_parent_cancels_its_branches(engine: Engine) -> None:
    await engine.trigger_agent("f3", Split, {"branches": 3, "step_time": 5})
    await parked(engine, "f3")
    assert await engine.cancel_agent("f3", "no longer needed")
    for i in range(3):
        branch = await engine.get_agent(f"f3/1/{i}")
        assert branch.status is AgentStatus.CANCELLED, branch


async def test_a_fan_out_of_a_thousand_branches(engine: Engine) -> None:
    await engine.trigger_agent("big", Split, {"branches": 1000})
    done = await engine.wait_for("big", timeout=120)
    assert done.status is AgentStatus.SUCCEEDED, done.error
    assert done.context["amount"] == sum(i * i for i in range(1000))
    assert done.context["log"] == ["split", "gathered:1000/1000"]
