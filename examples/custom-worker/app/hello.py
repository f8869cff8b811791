"""A two-node graph for the custom worker example: ``Hello`` -> ``Done``."""

from __future__ import annotations

from pydantic import BaseModel

from commandnet import Node


class Greeting(BaseModel):
    """The context persisted after every step."""

    name: str
    message: str = ""


class Hello(Node[Greeting]):
    """Start node: writes the greeting."""

    async def run(self, ctx: Greeting) -> type[Done]:
        ctx.message = f"hello, {ctx.name}"
        return Done


class Done(Node[Greeting]):
    """Terminal node."""

    async def run(self, ctx: Greeting) -> None:
        return None
