"""The demo's graph: an order flow with branching, a manual-review loop and a flaky provider.

    Intake -> RiskCheck -> Charge | ManualReview | Rejected
    ManualReview -> Charge | Rejected;  Charge -> Fulfil (the provider fails 25 % of calls,
    so Charge is retried with backoff; four failures in a row fail the agent)
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from pydantic import BaseModel, Field

from commandnet import Node, RetryPolicy


class ProviderUnavailable(ConnectionError):
    """The (simulated) payment provider did not answer."""


class Order(BaseModel):
    """An order on its way through the flow."""

    order_id: str
    amount: float = Field(gt=0)
    risk: float = 0.0
    reviewed: bool = False
    charged: bool = False
    log: list[str] = []


async def _work() -> None:
    await asyncio.sleep(random.uniform(0.005, 0.03))  # a call to some service


class Intake(Node[Order]):
    """Normalise the order and score its risk."""

    async def run(self, ctx: Order) -> type[RiskCheck]:
        await _work()
        ctx.risk = int(hashlib.sha256(ctx.order_id.encode()).hexdigest()[:6], 16) % 100 / 100
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

    async def run(self, ctx: Order) -> type[Fulfil]:
        await _work()
        if random.random() < 0.25:
            raise ProviderUnavailable(f"provider timed out charging {ctx.order_id}")
        ctx.charged = True
        ctx.log.append("charged")
        return Fulfil


class Fulfil(Node[Order]):
    """Ship it."""

    async def run(self, ctx: Order) -> None:
        await _work()
        ctx.log.append("fulfilled")


class Rejected(Node[Order]):
    """Tell the customer no."""

    async def run(self, ctx: Order) -> None:
        await _work()
        ctx.log.append("rejected")
