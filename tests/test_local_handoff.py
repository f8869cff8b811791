"""Local handoff (JetStreamBus ``local_handoff`` with PostgreSQL): the committing worker runs
the agent's next step itself; the step's durable outbox row is its recovery until it commits."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

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
