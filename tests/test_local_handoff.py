"""Local handoff (JetStreamBus ``local_handoff`` with PostgreSQL): the committing worker runs
the agent's next step itself; the step's durable outbox row is its recovery until it commits."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from commandnet import AgentStatus, Engine
from commandnet.adapters.nats import JetStreamBus
from commandnet.examples.linear import build_chain
from commandnet.messages import StepEvent
from commandnet.records import Commit, NewAgent
from commandnet.worker.handoff import OutboxRescue

MakeBus = Callable[..., JetStreamBus]
STEPS = 5


async def published(bus: JetStreamBus) -> int:
    """Messages ever stored in the work stream (acknowledged ones are gone, seqs stay)."""
    info = await bus.jetstream().stream_info(bus.stream)
    return int(info.state.last_seq)


async def outbox(store: Any) -> set[tuple[str, int]]:
    rows = await store.pool.fetch("SELECT agent_id, step FROM outbox")
    return {(r["agent_id"], r["step"]) for r in rows}


async def test_chains_run_locally_after_their_first_step(make_bus: MakeBus,
                                                         pg_store: Any) -> None:
    chain = build_chain(STEPS, prefix="Handoff")
    bus = make_bus(local_handoff=8)
    engine = Engine(pg_store, bus, graphs=[chain[0]], lease_seconds=5.0)
    await engine.start_worker()
    try:
        ids = [f"h{i}" for i in range(12)]
        for agent_id in ids:
            assert await engine.trigger_agent(agent_id, chain[0], {})
        for agent_id in ids:
            rec = await engine.wait_for(agent_id, timeout=60)
            assert (rec.status, rec.step) == (AgentStatus.SUCCEEDED, STEPS), rec.error
            history = await engine.get_history(agent_id)
            assert [h.step for h in history] == list(range(1, STEPS + 1))
        # Only the first step of each agent went through the stream; each later step's outbox
        # row was deleted by that step's own commit.
        assert await published(bus) == len(ids)
        assert await outbox(pg_store) == set()
    finally:
        await engine.stop()


async def test_a_handed_over_step_runs_on_the_lease_its_commit_kept(
        make_bus: MakeBus, pg_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Sticky execution: only step 0 (from the stream) asks for a lease; every later step runs
    # on the lease the commit before it kept, one statement per transition.
    chain = build_chain(STEPS, prefix="Kept")
    asked: list[int] = []
    lease = pg_store.load_and_lock_agent

    async def counted(agent_id: str, step: int, *args: Any, **kwargs: Any) -> Any:
        asked.append(step)
        return await lease(agent_id, step, *args, **kwargs)

    monkeypatch.setattr(pg_store, "load_and_lock_agent", counted)
    engine = Engine(pg_store, make_bus(local_handoff=64), graphs=[chain[0]], lease_seconds=5.0)
    await engine.start_worker()
    try:
        ids = [f"kept-{uuid.uuid4().hex[:8]}-{i}" for i in range(12)]
        for agent_id in ids:
            assert await engine.trigger_agent(agent_id, chain[0], {})
        for agent_id in ids:
            rec = await engine.wait_for(agent_id, timeout=60)
            assert (rec.status, rec.step, rec.lease_owner) == (AgentStatus.SUCCEEDED, STEPS, None)
            history = await engine.get_history(agent_id)
            assert [(h.step, h.attempts) for h in history] == [(i, 1) for i in range(1, STEPS + 1)]
        assert asked == [0] * len(ids)
        assert engine._kept == {}  # every kept lease was used
    finally:
        await engine.stop()


async def test_a_kept_lease_is_released_when_the_event_goes_to_the_stream(
        make_bus: MakeBus, pg_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The commit kept the next step's lease (the bus would hand it over), but by the time the
    # event is published the bus is full: the lease is released before the event goes to the
    # stream, so whichever worker gets the message leases the step at once.
    chain = build_chain(2, prefix="Given")
    bus = make_bus(local_handoff=64)
    engine = Engine(pg_store, bus, graphs=[chain[0]], lease_seconds=600.0)
    save, publish, release = pg_store.save_state, bus.publish, pg_store.release_lease
    released: list[int] = []

    async def saved_then_full(commit: Commit) -> bool:
        saved: bool = await save(commit)
        if commit.step == 0:
            bus.local_handoff = 0  # as if 64 handed-over steps were waiting now
        return saved

    async def published_then_room(message: Any) -> Any:
        try:
            return await publish(message)
        finally:
            bus.local_handoff = 64

    async def counted(agent_id: str, step: int, owner: str) -> None:
        released.append(step)
        await release(agent_id, step, owner)

    monkeypatch.setattr(pg_store, "save_state", saved_then_full)
    monkeypatch.setattr(pg_store, "release_lease", counted)
    monkeypatch.setattr(bus, "publish", published_then_room)
    # An id of its own: every test shares one work stream, whose de-dup window would drop
    # a step event whose agent:step id an earlier test published (tests/test_workflow_cli.py).
    given = f"given-{uuid.uuid4().hex[:8]}"
    await engine.start_worker()
    try:
        assert await engine.trigger_agent(given, chain[0], {})
        rec = await engine.wait_for(given, timeout=30)
        assert (rec.status, rec.step) == (AgentStatus.SUCCEEDED, 2), rec.error
        assert released == [1]
        assert [h.attempts for h in await engine.get_history(given)] == [1, 1]
    finally:
        await engine.stop()


async def test_steps_handed_over_but_not_started_at_stop_give_their_kept_leases_back(
        make_bus: MakeBus, pg_store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A draining worker publishes the handed-over steps still waiting for a slot; their kept
    # leases (600 s here) are released first, so another worker finishes them at once.
    monkeypatch.setenv("COMMANDNET_EXAMPLE_DELAY", "0.2")
    chain = build_chain(4, prefix="Drained")
    first = make_bus(local_handoff=64)
    engine = Engine(pg_store, first, graphs=[chain[0]], lease_seconds=600.0, max_in_flight=2)
    await engine.start_worker()
    ids = [f"drained-{uuid.uuid4().hex[:8]}-{i}" for i in range(8)]
    try:
        for agent_id in ids:
            assert await engine.trigger_agent(agent_id, chain[0], {})
        for _ in range(100):  # until steps wait for a slot, handed over
            if first._local:
                break
            await asyncio.sleep(0.05)
        assert first._local, "no handed-over step waited for a slot"
    finally:
        await engine.stop(grace=5.0)
    assert engine._kept == {}
    other = Engine(pg_store, make_bus(local_handoff=64), graphs=[chain[0]],
                   lease_seconds=600.0)
    await other.start_worker()
    try:
        for agent_id in ids:
            rec = await other.wait_for(agent_id, timeout=30)
            assert (rec.status, rec.step) == (AgentStatus.SUCCEEDED, 4), rec.error
            assert [h.step for h in await other.get_history(agent_id)] == [1, 2, 3, 4]
    finally:
        await other.stop()


async def test_without_a_subscriber_or_outside_a_handler_events_are_published(
        make_bus: MakeBus) -> None:
    bus = make_bus(local_handoff=8)
    await bus.connect()
    assert await bus.publish(StepEvent(agent_id="x", step=1)) is None  # not subscribed
    assert await published(bus) == 1


async def test_the_outbox_row_of_a_handed_over_step_is_re_published_when_its_worker_died(
        make_bus: MakeBus, pg_store: Any) -> None:
    # The commit of step 0 wrote (a1, 1); the worker that was handed step 1 died before
    # committing it, so only the outbox row knows about the step.
    assert await pg_store.create_agent(NewAgent("a1", "Start", {}, pool="default"))
    await pg_store.clear_outbox([])
    lease = await pg_store.load_and_lock_agent("a1", 0, "dead", 5.0)
    assert lease.record is not None
    assert await pg_store.save_state(Commit("a1", "dead", 0, "Start", "Next", {}, 1, 0.0))
    assert await outbox(pg_store) == {("a1", 1)}  # step 0's own row went with the commit
    bus = make_bus(local_handoff=8)
    await bus.connect()
    rescue = OutboxRescue(pg_store, bus, interval=0.1, grace=0.0)
    await asyncio.sleep(0.05)
    assert await rescue.run_once() == 1
    assert await outbox(pg_store) == set()
    assert await published(bus) == 1
