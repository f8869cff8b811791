"""commandnet.testing on several graph shapes: a crash anywhere changes nothing."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from commandnet import Node, RetryPolicy
from commandnet.examples.linear import Start as Step0
from commandnet.examples.linear import Trail as Counter
from commandnet.testing import CRASH_POINTS, FaultHarness
from tests.graphs import waiting


class Ctx(BaseModel):
    n: int = 0
    path: list[str] = []


class Left(Node[Ctx]):
    async def run(self, ctx: Ctx) -> None:
        ctx.path.append("L")


class Right(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Left]:
        ctx.path.append("R")
        return Left


class Branch(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Left] | type[Right]:
        ctx.path.append("B")
        return Left if ctx.n % 2 else Right


class Spin(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Spin] | type[Check] | None:
        ctx.n += 1
        return Spin if ctx.n % 3 else Check


class Check(Node[Ctx]):
    async def run(self, ctx: Ctx) -> type[Spin] | None:
        return None if ctx.n >= 6 else Spin


FLAKY: dict[str, int] = {}
QUICK = RetryPolicy(max_attempts=4, initial_interval=2.0, jitter=0)


class Charge(Node[Ctx], retry=QUICK):
    async def run(self, ctx: Ctx) -> type[Left]:
        key = str(ctx.n)
        FLAKY[key] = FLAKY.get(key, 0) + 1
        if FLAKY[key] < 3:
            raise ConnectionError("provider unavailable")
        return Left


class Doomed(Node[Ctx], retry=RetryPolicy(max_attempts=2, initial_interval=1.0)):
    async def run(self, ctx: Ctx) -> None:
        raise RuntimeError("always")


async def test_linear_graph() -> None:
    report = await FaultHarness(Step0, {"a": Counter(), "b": Counter()}).check()
    assert report.clean.agents["a"][:3] == ("succeeded", "Step9", 10)
    assert len(report.clean.history["a"]) == 10
    # every step of both agents was a crash site for the first two points
    assert report.crashes["before_commit"] == 20
    assert report.crashes["after_commit"] == 20
    assert report.crashes["after_publish"] == 18  # terminal steps publish nothing


async def test_branching_graph() -> None:
    report = await FaultHarness(Branch, {"odd": Ctx(n=1), "even": Ctx(n=2)}).check()
    assert report.clean.agents["odd"][1:3] == ("Left", 2)
    assert report.clean.agents["even"][1:3] == ("Left", 3)
    assert report.total > 0


async def test_cyclic_graph() -> None:
    report = await FaultHarness(Spin, {"c": Ctx()}).check()
    assert report.clean.agents["c"][0] == "succeeded"
    assert [h[1] for h in report.clean.history["c"]].count("Check") == 2


async def test_failing_then_succeeding_node() -> None:
    report = await FaultHarness(Charge, {"p": Ctx(n=7)}, reset=FLAKY.clear).check()
    assert report.clean.agents["p"][:3] == ("succeeded", "Left", 2)
    assert report.crashes["before_commit"] == 2


async def test_node_that_always_fails() -> None:
    report = await FaultHarness(Doomed, {"d": Ctx()}).check()
    assert report.clean.agents["d"][:3] == ("failed", "Doomed", 0)
    assert report.clean.history["d"] == []


async def test_a_durable_timer() -> None:
    report = await FaultHarness(waiting.Nap, {"t": waiting.Ctx(sleep_for=60)}).check()
    assert report.clean.agents["t"][:3] == ("succeeded", "Woke", 2)
    assert report.crashes["before_commit"] == 2 and report.crashes["after_commit"] == 2


async def test_a_fan_out_and_its_join_for_both_policies() -> None:
    agents = {"ok": waiting.Ctx(branches=3),
              "collect": waiting.Ctx(branches=3, fail_at="Square1", policy="collect"),
              # fail fast with one branch: with siblings, which of them end before the failure
              # depends on delivery order, which a crash changes (not a durability matter)
              "fast": waiting.Ctx(branches=1, fail_at="Square0")}
    report = await FaultHarness(waiting.Split, agents).check()
    assert report.clean.agents["ok"][:3] == ("succeeded", "Gather", 2)
    assert '"amount": 5' in report.clean.agents["ok"][3]  # 0 + 1 + 4
    assert '"amount": 4' in report.clean.agents["collect"][3]  # branch 1 failed
    assert report.clean.agents["fast"][0] == "failed"
    assert report.clean.agents["fast/1/0"][0] == "failed"
    assert report.clean.agents["ok/1/2"][:3] == ("succeeded", "Square", 1)
    assert report.crashes["before_commit"] == 10  # each commit: Split, Square, Gather


class Nondeterministic(Node[Ctx]):
    calls = 0

    async def run(self, ctx: Ctx) -> None:
        Nondeterministic.calls += 1
        ctx.n = Nondeterministic.calls  # depends on how often it ran: crashes show it


async def test_harness_detects_a_graph_that_is_not_crash_safe() -> None:
    with pytest.raises(AssertionError, match="crash at 'before_commit'"):
        await FaultHarness(Nondeterministic, {"x": Ctx()}).check(points=CRASH_POINTS[:1])
