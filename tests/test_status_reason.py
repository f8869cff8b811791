"""The CamelCase ``reason`` in the status bucket's value (for the Agent CR's conditions).

Each failure is produced for real by an in-memory Engine, and ``failure_reason`` is applied to
the error the engine stored and to the one it told its observers: if an engine message
changes, the classification breaks here, loudly, instead of turning into ``NodeFailed``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import BaseModel, Field
from typing_extensions import override

from commandnet import AgentStatus, Engine, Node, RetryPolicy
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.adapters.nats_status import (
    JetStreamStatusObserver,
    StatusReader,
    failure_reason,
)
from commandnet.messages import StepEvent
from commandnet.observer import Observer, StatusInfo
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
        return Done


class Sneaky(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> type[Done]:
        return Start  # type: ignore[return-value]


class Corrupt(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> None:
        ctx.hits = -5  # not validated on assignment; the engine validates the result


class Slow(Node[Ctx], retry=RetryPolicy(max_attempts=1, timeout=0.05)):
    async def run(self, ctx: Ctx) -> None:
        await asyncio.sleep(10)


class Raises(Node[Ctx], retry=RetryPolicy(max_attempts=1)):
    async def run(self, ctx: Ctx) -> None:
        # A node's own message that mimics the engine's texts is still the node's failure.
        raise ValueError(f"unknown node 'X' timed out after 1s; {ctx.query}")


class Hold(Node[Ctx], retry=FAST):
    async def run(self, ctx: Ctx) -> None:
        await asyncio.sleep(30)


class Recorder(Observer):
    def __init__(self) -> None:
        self.statuses: list[StatusInfo] = []

    @override
    async def on_status(self, info: StatusInfo) -> None:
        self.statuses.append(info)

    def final(self, agent_id: str) -> StatusInfo:
        return [s for s in self.statuses if s.agent_id == agent_id][-1]


GRAPHS = [Start, Sneaky, Corrupt, Slow, Raises, Hold]


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Engine, Recorder]]:
    recorder = Recorder()
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), graphs=GRAPHS,
                    observers=[recorder], lease_seconds=5, node_grace=0.0)
    await engine.start_worker()
    yield engine, recorder
    await engine.stop(grace=1)


async def reason_of(engine: Engine, recorder: Recorder, agent_id: str,
                    status: AgentStatus = AgentStatus.FAILED) -> str | None:
    """The reason of ``agent_id``'s final status: stored error and observed error agree."""
    rec = await engine.wait_for(agent_id, timeout=10)
    assert rec.status is status, (rec.status, rec.error)
    seen = recorder.final(agent_id)
    assert (seen.status, seen.error) == (rec.status, rec.error)
    reason = failure_reason(rec.status.value, rec.error)
    assert failure_reason(seen.status.value, seen.error) == reason
    return reason


async def test_unknown_node_from_a_trigger_and_node_removed_under_a_stored_agent(
        setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    outsider = Engine(engine.persistence, engine.bus)  # knows no graph, like the operator
    await outsider.trigger_agent("typo", "Strat", {"query": "x"})
    assert await reason_of(engine, recorder, "typo") == "UnknownNode"
    await engine.persistence.create_agent(NewAgent("ghost", "RemovedNode", {"query": "q"}))
    await engine.bus.publish(StepEvent(agent_id="ghost", step=0))
    assert await reason_of(engine, recorder, "ghost") == "NodeRemoved"  # node_grace 0: at once


class Order(BaseModel):
    amount: int


class Paid(Node[Ctx, Order], retry=FAST):
    async def run(self, ctx: Ctx) -> None:
        ctx.hits = self.payload.amount


async def test_invalid_payload_from_a_trigger_command(setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    engine.register(Paid)
    outsider = Engine(engine.persistence, engine.bus)
    await outsider.trigger_agent("bad-pay", "Paid", {}, payload={"amount": "lots"})
    assert await reason_of(engine, recorder, "bad-pay") == "InvalidPayload"


async def test_invalid_context_initial_stored_and_returned(
        setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    outsider = Engine(engine.persistence, engine.bus)
    await outsider.trigger_agent("initial", "Start", {"hits": "many"})
    assert await reason_of(engine, recorder, "initial") == "InvalidContext"
    await engine.persistence.create_agent(NewAgent("stored", "Start", {"query": 5}))
    await engine.bus.publish(StepEvent(agent_id="stored", step=0))
    assert await reason_of(engine, recorder, "stored") == "InvalidContext"
    await engine.trigger_agent("returned", Corrupt, Ctx())
    assert await reason_of(engine, recorder, "returned") == "InvalidContext"


def test_invalid_context_the_postgres_store_cannot_hold() -> None:
    # The store's own ContextValidationError (NaN in jsonb), as PostgresPersistence raises it.
    pytest.importorskip("asyncpg")
    from commandnet.adapters.postgres import _unstorable

    error = str(_unstorable("a1", "Charge", ValueError("Token \"NaN\" is invalid.")))
    assert failure_reason("failed", error) == "InvalidContext"


async def test_invalid_transition(setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    await engine.trigger_agent("sneaky", Sneaky, Ctx())
    assert await reason_of(engine, recorder, "sneaky") == "InvalidTransition"


async def test_node_timeout(setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    await engine.trigger_agent("slow", Slow, Ctx())
    assert await reason_of(engine, recorder, "slow") == "NodeTimeout"


async def test_worker_died(setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    store = engine.persistence
    await store.create_agent(NewAgent("poison", "Start", {"query": "q"}))
    for n in range(FAST.max_attempts + 1):  # workers that took the lease, alone, and died
        lease = await store.load_and_lock_agent("poison", 0, f"dead-{n}", 0.0, alone=True)
        assert lease.record is not None
    await engine.bus.publish(StepEvent(agent_id="poison", step=0))
    assert await reason_of(engine, recorder, "poison") == "WorkerDied"


async def test_a_node_that_raises_is_node_failed(setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    await engine.trigger_agent("raises", Raises, Ctx())
    assert await reason_of(engine, recorder, "raises") == "NodeFailed"


async def test_cancelled_running_and_succeeded(setup: tuple[Engine, Recorder]) -> None:
    engine, recorder = setup
    await engine.trigger_agent("held", Hold, Ctx())
    await engine.trigger_agent("fine", Start, Ctx())
    assert await reason_of(engine, recorder, "fine", AgentStatus.SUCCEEDED) is None
    fine = [(s.status, failure_reason(s.status.value, s.error)) for s in recorder.statuses
            if s.agent_id == "fine"]
    assert (AgentStatus.RUNNING, None) in fine and fine[-1] == (AgentStatus.SUCCEEDED, None)
    assert await engine.cancel_agent("held")
    assert await reason_of(engine, recorder, "held", AgentStatus.CANCELLED) == "Cancelled"


@pytest.mark.parametrize(("status", "error", "reason"), [
    ("running", "unknown node 'X': ...", None),
    ("succeeded", None, None),
    ("failed", None, "NodeFailed"),
    ("failed", "ValueError: unknown node 'X': this worker's graphs have A", "NodeFailed"),
    ("cancelled", None, "Cancelled"),
])
def test_reason_by_status(status: str, error: str | None, reason: str | None) -> None:
    assert failure_reason(status, error) == reason


async def test_the_status_bucket_value_carries_the_reason(
        make_bus: Callable[..., Any], nats_url: str) -> None:
    bus = make_bus(pool="reasons")
    await bus.connect()
    observer = JetStreamStatusObserver(bus)
    await observer.on_status(StatusInfo("t1", AgentStatus.FAILED, "Slow", 0,
                                        "node 'Slow' timed out after 0.05s"))
    await observer.on_status(StatusInfo("r1", AgentStatus.RUNNING, "Start", 0, None))
    await observer.close()
    async with StatusReader(nats_url, bucket=bus.status_bucket) as reader:
        failed = await reader.get_status("t1", "reasons")
        running = await reader.get_status("r1", "reasons")
    assert failed is not None and failed["reason"] == "NodeTimeout"
    assert failed["error"] == "node 'Slow' timed out after 0.05s"
    assert running is not None and "reason" in running and running["reason"] is None
