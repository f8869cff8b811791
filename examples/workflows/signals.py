"""Signals: ``WaitSignal[Approved, Expired]`` parks the agent until a named signal arrives
(its payload typed by the receiving node), or until the wait's timeout.

Run: python examples/workflows/signals.py
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from commandnet import Engine, Node, WaitSignal
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence


class Expense(BaseModel):
    amount: float
    wait_seconds: float = 60.0
    approved_by: str | None = None


class Approval(BaseModel):  # the signal's payload
    by: str


class Submit(Node[Expense]):
    async def run(self, ctx: Expense) -> WaitSignal[Approved, Expired]:
        return WaitSignal("approval", Approved, timeout=ctx.wait_seconds, on_timeout=Expired)


class Approved(Node[Expense, Approval]):
    async def run(self, ctx: Expense) -> None:
        ctx.approved_by = self.payload.by


class Expired(Node[Expense]):
    async def run(self, ctx: Expense) -> None:
        pass


async def main() -> None:
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), wake_interval=0.05)
    # A signal sent before the agent waits is kept: here no worker runs yet.
    await engine.trigger_agent("exp-1", Submit, Expense(amount=40))
    outcome = await engine.signal("exp-1", "approval", Approval(by="ana"))
    print(f"exp-1: signal before the wait -> {outcome.value}")
    await engine.start_worker()
    done = await engine.wait_for("exp-1", timeout=10)
    print(f"exp-1: approved by {done.context['approved_by']}")

    # A signal to a waiting agent; the same signal id again is applied once.
    await engine.trigger_agent("exp-2", Submit, Expense(amount=900))
    for _ in range(500):  # until it waits (a signal sent earlier would be kept anyway)
        if (await engine.get_agent("exp-2")).waiting == "approval":
            break
        await asyncio.sleep(0.01)
    for by in ("bob", "mallory"):
        outcome = await engine.signal("exp-2", "approval", {"by": by}, signal_id="mail-42")
        print(f"exp-2: signal mail-42 from {by} -> {outcome.value}")
    done = await engine.wait_for("exp-2", timeout=10)
    print(f"exp-2: approved by {done.context['approved_by']}")

    # No signal within the timeout: the agent moves to the timeout node.
    await engine.trigger_agent("exp-3", Submit, Expense(amount=5, wait_seconds=0.2))
    done = await engine.wait_for("exp-3", timeout=10)
    print(f"exp-3: {done.status.value} at {done.node}")
    for h in await engine.get_history("exp-3"):
        print(f"  step {h.step}: {h.from_node} -> {h.to_node} ({h.kind})")
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
