"""The same 10-node chain on pydantic-graph (class-based ``BaseNode`` API), with no persistence.

The yardstick of the one-process benchmark (bench/core.py): each node appends its name to a
dataclass state and returns the next node; the last returns ``End``. Agents run concurrently in
one event loop, all started at once, as the commandnet cases do. Instrumentation is off
(``auto_instrument=False``), pydantic-graph's fastest setting. Needs the ``bench`` extra.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic_graph import BaseNode, End, GraphBuilder, GraphRunContext
from pydantic_graph.step import NodeStep


@dataclass
class TrailState:
    """The nodes an agent passed through (as commandnet's ``Trail``)."""

    visited: list[str] = field(default_factory=list)


Ctx = GraphRunContext[TrailState, None]


@dataclass
class Step0(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step1:
        ctx.state.visited.append("Step0")
        return Step1()


@dataclass
class Step1(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step2:
        ctx.state.visited.append("Step1")
        return Step2()


@dataclass
class Step2(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step3:
        ctx.state.visited.append("Step2")
        return Step3()


@dataclass
class Step3(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step4:
        ctx.state.visited.append("Step3")
        return Step4()


@dataclass
class Step4(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step5:
        ctx.state.visited.append("Step4")
        return Step5()


@dataclass
class Step5(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step6:
        ctx.state.visited.append("Step5")
        return Step6()


@dataclass
class Step6(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step7:
        ctx.state.visited.append("Step6")
        return Step7()


@dataclass
class Step7(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step8:
        ctx.state.visited.append("Step7")
        return Step8()


@dataclass
class Step8(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> Step9:
        ctx.state.visited.append("Step8")
        return Step9()


@dataclass
class Step9(BaseNode[TrailState, None, None]):
    async def run(self, ctx: Ctx) -> End[None]:
        ctx.state.visited.append("Step9")
        return End(None)


NODES = (Step0, Step1, Step2, Step3, Step4, Step5, Step6, Step7, Step8, Step9)


def build_graph() -> Any:
    """The chain as a pydantic-graph ``Graph``; its input is the first node's instance."""
    builder = GraphBuilder(state_type=TrailState, input_type=Step0, auto_instrument=False)
    builder.add(builder.edge_from(builder.start_node).to(NodeStep(Step0)),
                *(builder.node(node) for node in NODES))
    return builder.build()


async def run_pydantic_graph(agents: int) -> dict[str, Any]:
    """Run ``agents`` chains concurrently (all started at once) and time them."""
    graph = build_graph()
    states = [TrailState() for _ in range(agents)]
    started = time.perf_counter()
    await asyncio.gather(*(graph.run(state=state, inputs=Step0(), infer_name=False)
                           for state in states))
    elapsed = time.perf_counter() - started
    assert all(len(state.visited) == len(NODES) for state in states)
    transitions = agents * len(NODES)
    return {"agents": agents, "arrivals_per_s": "all at once", "transitions": transitions,
            "seconds": round(elapsed, 3), "transitions_per_s": round(transitions / elapsed),
            "persistence": "none"}
