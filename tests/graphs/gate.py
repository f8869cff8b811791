"""A graph whose first node waits for a file: lets a test hold a step in flight at will.

``Hold`` appends its process id to ``started_file`` each time it starts (so a test sees where
and how often it ran), then waits until ``release_file`` exists. No sleeps to tune: the test
decides when the node may finish.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from commandnet import Node, RetryPolicy


class Gate(BaseModel):
    started_file: str
    release_file: str
    finished_by: int = 0  # pid of the process whose Hold got through


class Hold(Node[Gate], retry=RetryPolicy(timeout=None, initial_interval=0.05)):
    async def run(self, ctx: Gate) -> type[Done]:
        await asyncio.to_thread(_append_pid, ctx.started_file)
        # Polling, not an Event: the release comes from another process (the test).
        while not await asyncio.to_thread(os.path.exists, ctx.release_file):
            await asyncio.sleep(0.05)
        ctx.finished_by = os.getpid()
        return Done


def _append_pid(path: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\n")


class Done(Node[Gate]):
    async def run(self, ctx: Gate) -> None:
        return None
