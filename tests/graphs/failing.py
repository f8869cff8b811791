"""A one-node graph that always raises: two attempts, then the agent is failed."""

from __future__ import annotations

from pydantic import BaseModel

from commandnet import Node, RetryPolicy


class Ctx(BaseModel):
    n: int = 0


class AlwaysFails(Node[Ctx], retry=RetryPolicy(max_attempts=2, initial_interval=0.01,
                                                jitter=0)):
    async def run(self, ctx: Ctx) -> None:
        raise RuntimeError(f"AlwaysFails failed on purpose (n={ctx.n})")
