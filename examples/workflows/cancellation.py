"""Cancellation reaches every agent that is not final: one running a step, one parked on a
timer or a signal, and one waiting at a join, whose branches are cancelled with it.

Run: python examples/workflows/cancellation.py
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import BaseModel

from commandnet import (
    AgentRecord,
    BranchResult,
    CommandNetError,
    Engine,
    FanOut,
    Node,
    Sleep,
    WaitSignal,
)
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence


class Job(BaseModel):
    parts: int = 0


class Nap(Node[Job]):
    async def run(self, ctx: Job) -> Sleep[Done]:
        return Sleep(Done, seconds=3600)


class Ask(Node[Job]):
    async def run(self, ctx: Job) -> WaitSignal[Done]:
        return WaitSignal("go", Done)


class Split(Node[Job]):
    async def run(self, ctx: Job) -> FanOut[Join, Work]:
        return FanOut(Join, [(Work, Job()) for _ in range(ctx.parts)])


class Work(Node[Job]):
    async def run(self, ctx: Job) -> None:
        await asyncio.sleep(3600)  # a long step: cancelled, its result would be discarded


class Join(Node[Job, list[BranchResult[Job]]]):
    async def run(self, ctx: Job) -> None:
        pass


class Done(Node[Job]):
    async def run(self, ctx: Job) -> None:
        pass


async def parked(engine: Engine, agent_id: str) -> AgentRecord:
    """Poll until the agent is parked (a timer, a signal wait, a join)."""
    for _ in range(500):
        rec = await engine.get_agent(agent_id)
        if rec.parked:
            return rec
        await asyncio.sleep(0.01)
    raise TimeoutError(agent_id)


async def main() -> None:
    logging.getLogger("commandnet").setLevel(logging.ERROR)  # no "lease lost" warnings
    # lease_seconds=0.6: the lease heartbeat (every 0.2 s) stops a cancelled agent's running step
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), lease_seconds=0.6)
    await engine.start_worker()
    for agent_id, start in (("timer", Nap), ("waiter", Ask), ("parent", Split)):
        await engine.trigger_agent(agent_id, start, Job(parts=3))
    for agent_id in ("timer", "waiter", "parent"):
        rec = await parked(engine, agent_id)
        print(f"{agent_id}: parked at {rec.node}")

    for agent_id in ("timer", "waiter", "parent"):
        await engine.cancel_agent(agent_id, reason="no longer needed")
    for agent_id in ("timer", "waiter", "parent", "parent/1/0", "parent/1/1", "parent/1/2"):
        rec = await engine.get_agent(agent_id)
        print(f"{agent_id}: {rec.status.value} ({rec.error})")
    await asyncio.sleep(0.5)
    print(f"branch steps still running: {engine.in_flight}")
    try:
        await engine.signal("waiter", "go")
    except CommandNetError as exc:
        print(f"signal refused: {exc}")
    print(f"cancel again: {await engine.cancel_agent('timer')}")
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
