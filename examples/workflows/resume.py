"""Resume: run a failed (or cancelled) agent again from a chosen node of its graph, its context
changed by a validated JSON merge patch; the history keeps the whole story.

Run: python examples/workflows/resume.py
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import BaseModel, Field

from commandnet import ContextValidationError, Engine, Node, RetryPolicy
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence


class Transfer(BaseModel):
    amount: int = Field(gt=0)
    account: str
    note: str | None = None
    log: list[str] = []


class Debit(Node[Transfer]):
    async def run(self, ctx: Transfer) -> type[Credit]:
        ctx.log.append(f"debited {ctx.amount}")
        return Credit


class Credit(Node[Transfer], retry=RetryPolicy(max_attempts=1)):
    async def run(self, ctx: Transfer) -> None:
        if ctx.account == "closed-account":
            raise RuntimeError(f"{ctx.account} refuses the credit")
        ctx.log.append(f"credited {ctx.amount} to {ctx.account}")


async def main() -> None:
    logging.getLogger("commandnet").setLevel(logging.CRITICAL)  # the failure is planned
    engine = Engine(InMemoryPersistence(), InMemoryEventBus())
    await engine.start_worker()
    await engine.trigger_agent("tx-1", Debit,
                               Transfer(amount=50, account="closed-account", note="rent"))
    failed = await engine.wait_for("tx-1", timeout=10)
    print(f"tx-1: {failed.status.value} at {failed.node}: {(failed.error or '').splitlines()[0]}")

    try:  # the patched context is validated against Transfer before anything changes
        await engine.resume("tx-1", Credit, context_patch={"amount": -5})
    except ContextValidationError as exc:
        print(f"refused: {str(exc).splitlines()[0]}")

    # RFC 7396: keys merge, null deletes (note goes back to its default)
    patch = {"account": "savings", "note": None}
    print(f"resumed: {await engine.resume('tx-1', Credit, context_patch=patch)}")
    done = await engine.wait_for("tx-1", timeout=10)
    print(f"tx-1: {done.status.value}, log={done.context['log']}, note={done.context['note']}")
    for h in await engine.get_history("tx-1"):
        print(f"  step {h.step}: {h.from_node} -> {h.to_node} ({h.kind})")
    print(f"resume a succeeded agent: {await engine.resume('tx-1', Credit)}")
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
