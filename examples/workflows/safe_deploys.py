"""Safe deploys: a rolling upgrade whose new graph drops the node an agent is at. A new worker
hands such a step back for a worker that still has the node; after ``node_grace`` the agent
fails with reason NodeRemoved, naming the node and both graph versions.

Run: python examples/workflows/safe_deploys.py
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from pydantic import BaseModel

from commandnet import AgentRecord, Engine, GraphAnalyzer, Node, WaitSignal
from commandnet.adapters.memory import InMemoryEventBus
from commandnet.adapters.nats_status import failure_reason
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.workflow.deploys import version_of


class Ctx(BaseModel):
    log: list[str] = []


# Version 1: Start waits at Hold for the signal "go", then Done.
class Start(Node[Ctx]):
    async def run(self, ctx: Ctx) -> WaitSignal[Hold]:
        ctx.log.append("start:v1")
        return WaitSignal("go", Hold)


class Hold(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Done]:
        ctx.log.append("hold:v1")
        return Done


class Done(Node[Ctx]):
    async def run(self, ctx: Ctx) -> None:
        ctx.log.append("done:v1")


# Version 2: no Hold; the classes are renamed, their node names (name=...) are kept.
class Begin(Node[Ctx], name="Start"):
    async def run(self, ctx: Ctx) -> type[Finish]:
        ctx.log.append("start:v2")
        return Finish


class Finish(Node[Ctx], name="Done"):
    async def run(self, ctx: Ctx) -> None:
        ctx.log.append("done:v2")


V1 = version_of(GraphAnalyzer.validate(Start))
V2 = version_of(GraphAnalyzer.validate(Begin))


def named(text: str | None) -> str:
    """Versions shown as <v1> and <v2> (the real text has their first 12 hex digits)."""
    return (text or "").replace(V1, "<v1>").replace(V1[:12], "<v1>").replace(
        V2, "<v2>").replace(V2[:12], "<v2>")


class HandBacks(logging.Handler):
    """Collects the warnings of steps handed back (a worker logs one each time)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "handing the step back" in record.getMessage():
            self.seen.append(named(record.getMessage()))
            self.event.set()


async def parked(engine: Engine, agent_id: str) -> AgentRecord:
    """Poll until the agent is parked (here: waiting for its signal)."""
    for _ in range(500):
        rec = await engine.get_agent(agent_id)
        if rec.parked:
            return rec
        await asyncio.sleep(0.01)
    raise TimeoutError(agent_id)


async def main(db: Path) -> None:
    handbacks = HandBacks()
    logging.getLogger("commandnet").addHandler(handbacks)  # and no failure logs on stderr
    bus = InMemoryEventBus()  # the pool's bus: one consumer at a time, so the workers take turns

    def old() -> Engine:  # a worker (pod) of the old release
        return Engine(SQLitePersistence(db), bus, graphs=[Start], wake_interval=0.05)

    def new(node_grace: float = 600.0) -> Engine:  # a worker of the new release
        # lease_seconds=0.5: a step handed back is redelivered 0.5 s later (else 5 s)
        return Engine(SQLitePersistence(db), bus, graphs=[Begin], wake_interval=0.05,
                      lease_seconds=0.5, node_grace=node_grace)

    print(f"graph versions differ: {V1 != V2}")
    engine = old()
    await engine.start_worker()
    for agent_id in ("a1", "a2"):
        await engine.trigger_agent(agent_id, Start, Ctx())
        rec = await parked(engine, agent_id)
        print(f"{agent_id}: waiting at {rec.node}, graph version {named(rec.graph_version)}")
    await engine.stop()

    # The rollout: the new release runs; a1 gets its signal; the step at Hold is handed back.
    engine = new()
    await engine.start_worker()
    await engine.signal("a1", "go")
    await asyncio.wait_for(handbacks.event.wait(), 10)
    print(f"warning: {handbacks.seen[0].rsplit(' (', 1)[0]}")  # then "(0s of node_grace 600s)"
    rec = await engine.get_agent("a1")
    print(f"a1: {rec.status.value} at {rec.node}, attempts={rec.attempts}")
    await engine.stop()

    # An old pod, still draining, takes the step (redelivered to any worker of the pool).
    engine = old()
    await engine.start_worker()
    rec = await engine.wait_for("a1", timeout=10)
    print(f"a1: {rec.status.value}, log={rec.context['log']}")
    await engine.stop()

    # No old pod left: a2's step is handed back until node_grace (0.5 s here), then a2 fails.
    engine = new(node_grace=0.5)
    await engine.start_worker()
    await engine.signal("a2", "go")
    rec = await engine.wait_for("a2", timeout=10)
    reason = failure_reason(rec.status.value, rec.error)  # the Agent resource's reason
    print(f"a2: {rec.status.value} at {rec.node}, reason {reason}")
    print(f"  error: {named(rec.error)}")
    print(f"  history: {[(h.from_node, h.to_node) for h in await engine.get_history('a2')]}")
    print(f"a2: resumed at Done: {await engine.resume('a2', 'Done')}")  # a node v2 has
    rec = await engine.wait_for("a2", timeout=10)
    print(f"a2: {rec.status.value}, log={rec.context['log']}")

    # New agents run the new graph; "Start" and "Done" are the renamed classes' node names.
    await engine.trigger_agent("a3", "Start", Ctx())
    rec = await engine.wait_for("a3", timeout=10)
    print(f"a3: {rec.status.value}, log={rec.context['log']}, "
          f"graph version {named(rec.graph_version)}")
    await engine.stop()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp) / "store.db"))
