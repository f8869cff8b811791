"""Version 2 of tests/graphs/deploy_v1.py: no Hold, and the classes renamed; the stable node
names (``name=``) keep the agents of version 1 at Start and Done runnable."""

from __future__ import annotations

from pydantic import BaseModel

from commandnet import Node


class Ctx(BaseModel):
    log: list[str] = []


class Begin(Node[Ctx], name="Start"):
    async def run(self, ctx: Ctx) -> type[Finish]:
        ctx.log.append("start:v2")
        return Finish


class Finish(Node[Ctx], name="Done"):
    async def run(self, ctx: Ctx) -> None:
        ctx.log.append("done:v2")
