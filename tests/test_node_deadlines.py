"""Node timeouts: one timer serves every running node (commandnet/leasing/runs.py), so a short
timeout must not wait behind a long one, each deadline must be kept after the timer fired for
another, and a node's cancellation must leave its task as ``asyncio.timeout`` would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel

from commandnet import AgentStatus, Engine, Node, Observer, RetryPolicy, TransitionInfo
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence

GATE = asyncio.Event()


class Ctx(BaseModel):
    seconds: float = 10.0


def once(timeout: float | None) -> RetryPolicy:
    return RetryPolicy(max_attempts=1, timeout=timeout)


class Patient(Node[Ctx], retry=once(60)):
    """Holds the timer at a deadline a minute away until the gate opens."""

    async def run(self, ctx: Ctx) -> None:
        await GATE.wait()


class Unbounded(Node[Ctx], retry=once(None)):
    async def run(self, ctx: Ctx) -> None:
        await GATE.wait()


class Hasty(Node[Ctx], retry=once(0.05)):
    async def run(self, ctx: Ctx) -> None:
        await asyncio.sleep(ctx.seconds)


class Hastier(Node[Ctx], retry=once(0.02)):
    async def run(self, ctx: Ctx) -> None:
        await asyncio.sleep(ctx.seconds)


class Leisurely(Node[Ctx], retry=once(0.2)):
    async def run(self, ctx: Ctx) -> None:
        await asyncio.sleep(ctx.seconds)


class OwnTimeout(Node[Ctx], retry=once(60)):
    async def run(self, ctx: Ctx) -> None:
        raise TimeoutError("the payment provider did not answer")


class Stubborn(Node[Ctx], retry=once(0.05)):
    """Swallows the cancellation of its timeout and finishes anyway."""

    async def run(self, ctx: Ctx) -> None:
        try:
            await asyncio.sleep(ctx.seconds)
        except asyncio.CancelledError:
            pass


class TaskState(Observer):
    """The cancellation requests left on the task that ran the step, seen after its commit."""

    def __init__(self) -> None:
        self.cancelling: dict[str, int] = {}

    async def on_step(self, info: TransitionInfo) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.cancelling[info.agent_id] = task.cancelling()


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    GATE.clear()
    eng = Engine(InMemoryPersistence(), InMemoryEventBus(), lease_seconds=5)
    await eng.start_worker()
    yield eng
    GATE.set()
    await eng.stop(grace=2)


async def test_a_short_timeout_does_not_wait_behind_a_long_one(engine: Engine) -> None:
    await engine.trigger_agent("patient", Patient, Ctx())
    await engine.trigger_agent("unbounded", Unbounded, Ctx())
    while engine.in_flight < 2:
        await asyncio.sleep(0.01)
    for agent, node in (("leisurely", Leisurely), ("hasty", Hasty), ("hastier", Hastier)):
        await engine.trigger_agent(agent, node, Ctx())
    for agent, timeout in (("hastier", 0.02), ("hasty", 0.05), ("leisurely", 0.2)):
        rec = await engine.wait_for(agent, timeout=10)
        assert rec.status is AgentStatus.FAILED, (agent, rec)
        assert rec.error == f"node {rec.node!r} timed out after {timeout}s", rec.error
    # The long-deadline and the unbounded node were left alone, and finish once let go.
    assert (await engine.get_agent("patient")).status is AgentStatus.RUNNING
    GATE.set()
    for agent in ("patient", "unbounded"):
        assert (await engine.wait_for(agent, timeout=10)).status is AgentStatus.SUCCEEDED


async def test_each_timeout_is_kept_after_the_timer_fired_for_another(engine: Engine) -> None:
    for i in range(5):  # the same node, started one after another: deadlines in a row
        await engine.trigger_agent(f"row-{i}", Hasty, Ctx())
        await asyncio.sleep(0.01)
    for i in range(5):
        rec = await engine.wait_for(f"row-{i}", timeout=10)
        assert rec.status is AgentStatus.FAILED and "timed out after 0.05s" in (rec.error or "")


async def test_a_nodes_own_timeout_error_is_an_ordinary_failure(engine: Engine) -> None:
    await engine.trigger_agent("own", OwnTimeout, Ctx())
    rec = await engine.wait_for("own", timeout=10)
    assert rec.status is AgentStatus.FAILED
    assert (rec.error or "").startswith("TimeoutError: the payment provider did not answer")


async def test_a_node_that_swallows_its_timeout_commits_and_leaves_no_cancellation(
        engine: Engine) -> None:
    state = TaskState()
    engine.observers.append(state)
    await engine.trigger_agent("stubborn", Stubborn, Ctx())
    await engine.trigger_agent("quick", Stubborn, Ctx(seconds=0))
    for agent in ("stubborn", "quick"):
        assert (await engine.wait_for(agent, timeout=10)).status is AgentStatus.SUCCEEDED
    assert state.cancelling == {"stubborn": 0, "quick": 0}
