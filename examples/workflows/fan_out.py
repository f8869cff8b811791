"""Fan-out and join: ``FanOut[Join, Branch]`` runs branches in parallel as sub-agents, then the
join node once, with every branch's result as its payload (``list[BranchResult[Ctx]]``).

Run: python examples/workflows/fan_out.py
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from pydantic import BaseModel

from commandnet import BranchResult, Engine, FanOut, Node, RetryPolicy
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence


class Crawl(BaseModel):
    urls: list[str] = []
    policy: Literal["fail_fast", "collect"] = "collect"
    url: str = ""  # a branch's page
    size: int = 0
    total: int = 0
    broken: list[str] = []


class Start(Node[Crawl]):
    async def run(self, ctx: Crawl) -> FanOut[Sum, Fetch]:
        branches = [(Fetch, Crawl(url=url)) for url in ctx.urls]  # (start node, context)
        return FanOut(Sum, branches, policy=ctx.policy)


class Fetch(Node[Crawl], retry=RetryPolicy(max_attempts=1)):
    async def run(self, ctx: Crawl) -> None:
        await asyncio.sleep(0.05)
        if ctx.url.endswith("/404"):
            raise ConnectionError(f"{ctx.url}: not found")
        ctx.size = 100 * len(ctx.url)


class Sum(Node[Crawl, list[BranchResult[Crawl]]]):
    """The join: runs once, after every branch has ended; merging is its own code."""

    async def run(self, ctx: Crawl) -> None:
        for result in self.payload:  # in the order the fan-out listed the branches
            error = (result.error or "").split("\n")[0]
            print(f"  {result.agent_id}: {result.status} at {result.node} "
                  f"size={result.context.size} {error}".rstrip())
            if result.status == "succeeded":
                ctx.total += result.context.size
            else:
                ctx.broken.append(result.context.url)


async def main() -> None:
    logging.getLogger("commandnet").setLevel(logging.CRITICAL)  # the failing branch is planned
    engine = Engine(InMemoryPersistence(), InMemoryEventBus(), wake_interval=0.05)
    await engine.start_worker()
    urls = ["a.example/", "b.example/x", "c.example/404"]
    await engine.trigger_agent("crawl-1", Start, Crawl(urls=urls, policy="collect"))
    done = await engine.wait_for("crawl-1", timeout=10)
    print(f"crawl-1 (collect): {done.status.value}, total={done.context['total']}, "
          f"broken={done.context['broken']}")
    branch = await engine.get_agent("crawl-1/1/0")
    print(f"branch crawl-1/1/0: parent={branch.parent_id} status={branch.status.value}")

    await engine.trigger_agent("crawl-2", Start, Crawl(urls=urls, policy="fail_fast"))
    done = await engine.wait_for("crawl-2", timeout=10)
    print(f"crawl-2 (fail_fast): {done.status.value}: {(done.error or '').splitlines()[0]}")
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main())
