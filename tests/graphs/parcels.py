"""A small branching graph for a second pool: ``Receive -> Weigh -> Light | Heavy -> Ship``.

Its node names differ from the linear graph's (``Step0`` ... ``Step9``), so a worker of one pool
that ran the other pool's agent would fail it with "unknown node". Every agent takes four steps
and ends at ``Ship``; ``visited`` records each node that ran (a doubled transition shows).
``COMMANDNET_EXAMPLE_DELAY`` (seconds) makes every node sleep, to have time to kill a worker.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from commandnet import Node

DELAY = float(os.environ.get("COMMANDNET_EXAMPLE_DELAY", "0"))


class Parcel(BaseModel):
    weight: int = 0
    visited: list[str] = []


async def _visit(node: Node[Parcel], ctx: Parcel) -> None:
    if DELAY:
        await asyncio.sleep(DELAY)
    ctx.visited.append(node.node_name)


class Receive(Node[Parcel]):
    async def run(self, ctx: Parcel) -> type[Weigh]:
        await _visit(self, ctx)
        return Weigh


class Weigh(Node[Parcel]):
    async def run(self, ctx: Parcel) -> type[Light] | type[Heavy]:
        await _visit(self, ctx)
        return Heavy if ctx.weight >= 10 else Light


class Light(Node[Parcel]):
    async def run(self, ctx: Parcel) -> type[Ship]:
        await _visit(self, ctx)
        return Ship


class Heavy(Node[Parcel]):
    async def run(self, ctx: Parcel) -> type[Ship]:
        await _visit(self, ctx)
        return Ship


class Ship(Node[Parcel]):
    async def run(self, ctx: Parcel) -> None:
        await _visit(self, ctx)
        return None


def route(weight: int) -> list[str]:
    """The nodes an agent of this weight runs, in order."""
    return ["Receive", "Weigh", "Heavy" if weight >= 10 else "Light", "Ship"]
