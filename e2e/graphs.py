"""Graphs the operator's end-to-end tests and benchmark run (``commandnet worker --graph
e2e.graphs:Hello``). Every node sleeps ``ctx.delay`` seconds, so a test can watch a node."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, Field

from commandnet import Node


class Job(BaseModel):
    """The context: who it is for, how long each node takes, and the nodes passed."""

    name: str
    delay: float = Field(default=0.0, ge=0)
    trail: list[str] = []


async def _visit(node: Node[Job], ctx: Job) -> None:
    if ctx.delay:
        await asyncio.sleep(ctx.delay)
    ctx.trail.append(node.node_name)


class Hello(Node[Job]):
    """Three nodes: Hello -> Work -> Done."""

    async def run(self, ctx: Job) -> type[Work]:
        await _visit(self, ctx)
        return Work


class Work(Node[Job]):
    async def run(self, ctx: Job) -> type[Done]:
        await _visit(self, ctx)
        return Done


class Done(Node[Job]):
    async def run(self, ctx: Job) -> None:
        await _visit(self, ctx)


class Six1(Node[Job]):
    """Six nodes: Six1 -> ... -> Six6."""

    async def run(self, ctx: Job) -> type[Six2]:
        await _visit(self, ctx)
        return Six2


class Six2(Node[Job]):
    async def run(self, ctx: Job) -> type[Six3]:
        await _visit(self, ctx)
        return Six3


class Six3(Node[Job]):
    async def run(self, ctx: Job) -> type[Six4]:
        await _visit(self, ctx)
        return Six4


class Six4(Node[Job]):
    async def run(self, ctx: Job) -> type[Six5]:
        await _visit(self, ctx)
        return Six5


class Six5(Node[Job]):
    async def run(self, ctx: Job) -> type[Six6]:
        await _visit(self, ctx)
        return Six6


class Six6(Node[Job]):
    async def run(self, ctx: Job) -> None:
        await _visit(self, ctx)


def _spin(seconds: float) -> None:
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        sum(i * i for i in range(2_000))


class Burn(Node[Job]):
    """CPU-bound work (autoscaling tests): ``ctx.delay`` seconds of CPU, then Cool. In a
    thread, as real CPU-bound steps should be, so the worker's loop still answers its probes
    and renews its leases."""

    async def run(self, ctx: Job) -> type[Cool]:
        await asyncio.to_thread(_spin, ctx.delay)
        ctx.trail.append(self.node_name)
        return Cool


class Cool(Node[Job]):
    async def run(self, ctx: Job) -> None:
        ctx.trail.append(self.node_name)
