"""Graphs that wait: a durable timer, a signal with a typed payload and a timeout, a node that
takes a trigger's payload, and a fan-out whose join sums its branches. Used by
tests/test_workflow_features.py and the CLI tests."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from commandnet import BranchResult, FanOut, Node, RetryPolicy, Sleep, WaitSignal


class Ctx(BaseModel):
    log: list[str] = []
    approved_by: str | None = None
    amount: int = 0
    sleep_for: float = 0.3
    timeout: float = 30.0
    fail_at: str | None = None
    policy: str = "fail_fast"
    branches: int = 0
    step_time: float = 0.0


class Approval(BaseModel):
    by: str
    note: str = ""


class Order(BaseModel):
    amount: int


NO_RETRY = RetryPolicy(max_attempts=1, timeout=10)


class Nap(Node[Ctx]):
    async def run(self, ctx: Ctx) -> Sleep[Woke]:
        ctx.log.append("nap")
        return Sleep(Woke, seconds=ctx.sleep_for)


class Woke(Node[Ctx]):
    async def run(self, ctx: Ctx) -> None:
        ctx.log.append("woke")


class Ask(Node[Ctx]):
    async def run(self, ctx: Ctx) -> WaitSignal[Approved, Expired]:
        ctx.log.append("ask")
        return WaitSignal("approval", Approved, timeout=ctx.timeout, on_timeout=Expired)


class Approved(Node[Ctx, Approval], retry=NO_RETRY):
    async def run(self, ctx: Ctx) -> type[Charge] | None:
        ctx.log.append(f"approved:{self.payload.by}")
        ctx.approved_by = self.payload.by
        return Charge if ctx.amount else None


class Expired(Node[Ctx]):
    async def run(self, ctx: Ctx) -> None:
        ctx.log.append("expired")


class Charge(Node[Ctx], retry=NO_RETRY):
    async def run(self, ctx: Ctx) -> None:
        if ctx.fail_at == "Charge":
            raise RuntimeError("card declined")
        ctx.log.append(f"charge:{ctx.amount}")


class TakeOrder(Node[Ctx, Order], retry=NO_RETRY):
    """Starts with a trigger's payload."""

    async def run(self, ctx: Ctx) -> type[Ask]:
        ctx.amount = self.payload.amount
        ctx.log.append(f"order:{self.payload.amount}")
        return Ask


class Wrong(Node[Ctx]):
    """Hinted as a timer, returns a plain move: refused, never routed."""

    async def run(self, ctx: Ctx) -> Sleep[Woke]:
        return Woke  # type: ignore[return-value]


class Split(Node[Ctx]):
    """Fans out ``branches`` squares and sums them in the join."""

    async def run(self, ctx: Ctx) -> FanOut[Gather, Square]:
        ctx.log.append("split")
        work = [(Square, Ctx(amount=i, fail_at=ctx.fail_at, step_time=ctx.step_time))
                for i in range(ctx.branches)]
        return FanOut(Gather, work, policy="collect" if ctx.policy == "collect" else "fail_fast")


class Square(Node[Ctx], retry=NO_RETRY):
    async def run(self, ctx: Ctx) -> None:
        if ctx.step_time:
            await asyncio.sleep(ctx.step_time)
        if ctx.fail_at == f"Square{ctx.amount}":
            raise RuntimeError(f"square {ctx.amount} failed")
        ctx.amount = ctx.amount ** 2


class Gather(Node[Ctx, list[BranchResult[Ctx]]]):
    async def run(self, ctx: Ctx) -> None:
        done = [r for r in self.payload if r.status == "succeeded"]
        ctx.amount = sum(r.context.amount for r in done)
        ctx.log.append(f"gathered:{len(done)}/{len(self.payload)}")
