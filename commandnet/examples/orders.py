"""The demo's graph: an order flow with branching, a manual-review loop, a flaky provider, a
parallel fan-out and a durable timer.

    Intake -> RiskCheck -> Charge | ManualReview | Rejected
    ManualReview -> Charge | Rejected
    Charge -> Pick (the provider fails 25 % of calls, so Charge is retried with backoff; four
        failures in a row fail the agent)
    Pick -> FanOut: one PickItem branch per line item, in parallel (sub-agents, any worker),
        then the join Pack once, with every branch's result
    Pack -> Sleep 0.2 s -> Fulfil (waits for the courier parked in the store: no worker slot)
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from pydantic import BaseModel, Field

from commandnet import BranchResult, FanOut, Node, RetryPolicy, Sleep

COURIER_WAIT = 0.2  # seconds an order waits for the courier, on a durable timer


class ProviderUnavailable(ConnectionError):
    """The (simulated) payment provider did not answer."""


class Order(BaseModel):
    """An order on its way through the flow."""

    order_id: str
    amount: float = Field(gt=0)
    risk: float = 0.0
    lines: int = Field(default=0, ge=0)  # line items (0: Intake picks 1 to 3)
    line: int | None = None  # the line item a PickItem branch picks
    picked: int = 0
    reviewed: bool = False
    charged: bool = False
    log: list[str] = []


async def _work() -> None:
    await asyncio.sleep(random.uniform(0.005, 0.03))  # a call to some service


class Intake(Node[Order]):
    """Normalise the order and score its risk."""

    async def run(self, ctx: Order) -> type[RiskCheck]:
        await _work()
        digest = int(hashlib.sha256(ctx.order_id.encode()).hexdigest()[:6], 16)
        ctx.risk = digest % 100 / 100
        ctx.lines = ctx.lines or 1 + digest // 100 % 3
        ctx.log.append("intake")
        return RiskCheck


class RiskCheck(Node[Order]):
    """Route by risk: most orders go straight to payment."""

    async def run(self, ctx: Order) -> type[Charge] | type[ManualReview] | type[Rejected]:
        await _work()
        ctx.log.append(f"risk={ctx.risk:.2f}")
        if ctx.risk > 0.9:
            return Rejected
        return ManualReview if ctx.risk > 0.7 else Charge


class ManualReview(Node[Order]):
    """A second look at risky orders (approves the smaller ones)."""

    async def run(self, ctx: Order) -> type[Charge] | type[Rejected]:
        await _work()
        ctx.reviewed = True
        ctx.log.append("reviewed")
        return Charge if ctx.amount < 500 else Rejected


class Charge(Node[Order], retry=RetryPolicy(max_attempts=4, initial_interval=0.05,
                                            max_interval=0.5, timeout=10)):
    """Take the payment from a provider that fails a quarter of the time."""

    async def run(self, ctx: Order) -> type[Pick]:
        await _work()
        if random.random() < 0.25:
            raise ProviderUnavailable(f"provider timed out charging {ctx.order_id}")
        ctx.charged = True
        ctx.log.append("charged")
        return Pick


# The ignores: Node.run's declared return type (for mypy) does not admit directives yet, and
# NodeClass (type[Node[Any]]) does not admit a node with a payload type (Pack).
class Pick(Node[Order]):
    """Pick every line item from the warehouse in parallel: one branch each, then Pack."""

    async def run(self, ctx: Order) -> FanOut[Pack, PickItem]:
        ctx.log.append(f"picking {ctx.lines} line(s)")
        branches = [(PickItem, ctx.model_copy(update={"line": i, "log": []}))
                    for i in range(ctx.lines)]
        return FanOut(Pack, branches)


class PickItem(Node[Order]):
    """A branch: take one line item off the shelf."""

    async def run(self, ctx: Order) -> None:
        await _work()
        ctx.log.append(f"picked line {ctx.line}")


class Pack(Node[Order, list[BranchResult[Order]]]):
    """The join: runs once, after every branch ended; then wait for the courier (a timer)."""

    async def run(self, ctx: Order) -> Sleep[Fulfil]:
        await _work()
        ctx.picked = sum(1 for result in self.payload if result.status == "succeeded")
        ctx.log.append(f"packed {ctx.picked} line(s)")
        return Sleep(Fulfil, seconds=COURIER_WAIT)


class Fulfil(Node[Order]):
    """Hand it to the courier."""

    async def run(self, ctx: Order) -> None:
        await _work()
        ctx.log.append("fulfilled")


class Rejected(Node[Order]):
    """Tell the customer no."""

    async def run(self, ctx: Order) -> None:
        await _work()
        ctx.log.append("rejected")
