"""Version 1 of a graph a rolling upgrade changes (tests/test_safe_deploys.py): Start parks at
Hold until the signal "go", then Done. Version 2 (deploy_v2) drops Hold and renames the classes."""

from __future__ import annotations

from pydantic import BaseModel

from commandnet import Node, WaitSignal


class Ctx(BaseModel):
    log: list[str] = []


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
