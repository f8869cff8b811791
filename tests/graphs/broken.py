"""Things that are not runnable graphs, for the worker's --graph error messages."""

from __future__ import annotations

from pydantic import BaseModel

from commandnet import Node


class NotANode(BaseModel):
    x: int = 0


not_a_class = 42


class Ctx(BaseModel):
    n: int = 0


class Dangling(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Missing]:  # type: ignore[name-defined]  # noqa: F821
        raise AssertionError("never runs")

