"""A linear chain of trivial nodes, ``Step0 -> Step1 -> ... -> Step9`` (benchmarks, crash tests).

``COMMANDNET_EXAMPLE_DELAY`` (seconds) makes every node sleep, to have time to kill a worker.
"""

from __future__ import annotations

import asyncio
import os
import types
from typing import Any

from pydantic import BaseModel

from commandnet import Node


class Trail(BaseModel):
    """The nodes an agent passed through."""

    visited: list[str] = []


def build_chain(length: int, prefix: str = "Step") -> list[type[Node[Trail]]]:
    """``length`` node classes, each returning the next; the last one finishes."""
    delay = float(os.environ.get("COMMANDNET_EXAMPLE_DELAY", "0"))
    chain: list[type[Node[Trail]]] = []
    for index in reversed(range(length)):
        successor = chain[0] if chain else None

        async def run(self: Node[Trail], ctx: Trail, _next: Any = successor) -> Any:
            if delay:
                await asyncio.sleep(delay)
            ctx.visited.append(self.node_name)
            return _next

        run.__annotations__ = {"ctx": Trail, "return": type[successor] if successor else None}
        def fill(namespace: dict[str, Any], run: Any = run) -> None:
            namespace.update(run=run, __module__=__name__)

        node = types.new_class(f"{prefix}{index}", (Node[Trail],), {}, fill)
        chain.insert(0, node)
    return chain


CHAIN = build_chain(10)
globals().update({node.__name__: node for node in CHAIN})
Start = CHAIN[0]
