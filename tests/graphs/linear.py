"""A 10-node linear graph: Step0 -> Step1 -> ... -> Step9 -> end (10 transitions)."""

from __future__ import annotations

from pydantic import BaseModel

from commandnet import Node


class Trail(BaseModel):
    """The nodes an agent passed through, in order."""

    visited: list[str] = []


class Step0(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step1]:
        ctx.visited.append("Step0")
        return Step1


class Step1(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step2]:
        ctx.visited.append("Step1")
        return Step2


class Step2(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step3]:
        ctx.visited.append("Step2")
        return Step3


class Step3(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step4]:
        ctx.visited.append("Step3")
        return Step4


class Step4(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step5]:
        ctx.visited.append("Step4")
        return Step5


class Step5(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step6]:
        ctx.visited.append("Step5")
        return Step6


class Step6(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step7]:
        ctx.visited.append("Step6")
        return Step7


class Step7(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step8]:
        ctx.visited.append("Step7")
        return Step8


class Step8(Node[Trail]):
    async def run(self, ctx: Trail) -> type[Step9]:
        ctx.visited.append("Step8")
        return Step9


class Step9(Node[Trail]):
    async def run(self, ctx: Trail) -> None:
        ctx.visited.append("Step9")
        return None
