"""Core benchmark: N agents through a 10-node chain of trivial nodes, in one process."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from commandnet import Engine, Observer, TransitionInfo
from commandnet.adapters.memory import InMemoryEventBus, InMemoryPersistence
from commandnet.adapters.sqlite import SQLitePersistence
from commandnet.bus import EventBus
from commandnet.examples.linear import Start, Trail
from commandnet.messages import AnyMessage, StepEvent
from commandnet.persistence import Persistence


class LatencyProbe(Observer):
    """Step latency: from the publish of step N to the commit of step N (the transition N+1)."""

    def __init__(self) -> None:
        self.published: dict[tuple[str, int], float] = {}
        self.latencies: list[float] = []

    async def on_step(self, info: TransitionInfo) -> None:
        sent = self.published.pop((info.agent_id, info.step - 1), None)
        if sent is not None:
            self.latencies.append(time.perf_counter() - sent)


class TimedBus(InMemoryEventBus):
    def __init__(self, probe: LatencyProbe) -> None:
        super().__init__()
        self.probe = probe

    async def publish(self, message: AnyMessage) -> None:
        if isinstance(message, StepEvent):
            self.probe.published[(message.agent_id, message.step)] = time.perf_counter()
        await super().publish(message)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, in milliseconds."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_case(store: Persistence, agents: int, max_in_flight: int = 256,
                   rate: float | None = None, probe: bool = True) -> dict[str, Any]:
    """Trigger ``agents`` agents (all at once, or ``rate`` per second), wait for all, measure;
    ``probe``: measure step latency too (its own cost, a few microseconds per transition, is
    then part of the throughput)."""
    latency = LatencyProbe()
    bus: EventBus = TimedBus(latency) if probe else InMemoryEventBus()
    engine = Engine(store, bus, graphs=[Start], observers=[latency] if probe else [],
                    max_in_flight=max_in_flight)
    await engine.start_worker()
    done = asyncio.Event()
    finished = 0

    class Finish(Observer):
        async def on_step(self, info: TransitionInfo) -> None:
            nonlocal finished
            if info.to_node is None:
                finished += 1
                if finished == agents:
                    done.set()

    engine.observers.append(Finish())
    started = time.perf_counter()
    for i in range(agents):
        await engine.trigger_agent(f"bench-{i}", Start, Trail())
        if rate:
            await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
    await asyncio.wait_for(done.wait(), timeout=600)
    elapsed = time.perf_counter() - started
    await engine.stop()
    transitions = agents * 10
    return {
        "agents": agents,
        "arrivals_per_s": rate or "all at once",
        "transitions": transitions,
        "seconds": round(elapsed, 3),
        "transitions_per_s": round(transitions / elapsed),
        **(_latencies(latency.latencies) if probe else {}),
    }


def _latencies(values: list[float]) -> dict[str, float]:
    return {"step_latency_ms_p50": round(percentile(values, 50), 3),
            "step_latency_ms_p99": round(percentile(values, 99), 3),
            "step_latency_ms_mean": round(1000 * statistics.fmean(values), 3)}


async def _sqlite_case(agents: int, sync: str, rate: float | None = None,
                       probe: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="commandnet-bench-", dir=Path.cwd()) as tmp:
        store = SQLitePersistence(Path(tmp) / "bench.db", synchronous=sync)  # type: ignore[arg-type]
        return await run_case(store, agents, rate=rate, probe=probe)


async def compare(agents: int, rounds: int = 5) -> dict[str, Any]:
    """Saturated runs of each store side by side with pydantic-graph (no persistence at all).

    The cases take turns, ``rounds`` times, so that load from other processes falls on all of
    them alike; each case keeps its best round (the one least disturbed), and the ratios are
    given both from the best rounds and as the median of the per-round ratios. These rounds run
    without the latency probe (pydantic-graph has none); the saturated step latency of each
    store comes from one more run with it.
    """
    try:
        from .pgraph import run_pydantic_graph
    except ImportError as exc:  # the `bench` extra is not installed
        run_pydantic_graph = None  # type: ignore[assignment]
        missing = f"pydantic-graph not available ({exc}); pip install -e '.[bench]'"
    cases: dict[str, Any] = {
        "memory": lambda probe: run_case(InMemoryPersistence(), agents, probe=probe),
        # SQLitePersistence() as users get it: WAL, synchronous=NORMAL (durable across a
        # process crash; FULL, below, also across a power cut).
        "sqlite_normal": lambda probe: _sqlite_case(agents, "NORMAL", probe=probe),
        "sqlite_full": lambda probe: _sqlite_case(agents, "FULL", probe=probe),
    }
    if run_pydantic_graph is not None:
        cases["pydantic_graph"] = lambda probe: run_pydantic_graph(agents)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            runs[name].append(await case(False))
    results: dict[str, Any] = {
        name: {**max(rows, key=lambda r: r["transitions_per_s"]), "rounds": rounds,
               "transitions_per_s_each": [r["transitions_per_s"] for r in rows]}
        for name, rows in runs.items()}
    for name in ("memory", "sqlite_normal", "sqlite_full"):
        probed = await cases[name](True)
        results[name].update({key: value for key, value in probed.items()
                              if key.startswith("step_latency")},
                             step_latency_from="one more saturated run, with the latency probe")
    if run_pydantic_graph is None:
        results["vs_pydantic_graph"] = {"error": missing}
        return results
    versus: dict[str, Any] = {"baseline": "pydantic-graph, BaseNode API, no persistence",
                              "sqlite_default_mode": "WAL, synchronous=NORMAL"}
    for name in ("memory", "sqlite_normal", "sqlite_full"):
        each = [ours["transitions_per_s"] / theirs["transitions_per_s"]
                for ours, theirs in zip(runs[name], runs["pydantic_graph"], strict=True)]
        versus[name] = {"best_vs_best": round(results[name]["transitions_per_s"]
                                              / results["pydantic_graph"]["transitions_per_s"], 2),
                        "median_of_rounds": round(statistics.median(each), 2),
                        "each_round": [round(r, 2) for r in each]}
    versus["targets"] = {"sqlite_normal": 1.0, "memory": 3.0}
    results["vs_pydantic_graph"] = versus
    return results


async def run_all(agents: int) -> dict[str, Any]:
    """Each store saturated (all agents at once, beside pydantic-graph), then paced at a steady
    arrival rate.

    Saturated runs measure throughput; their step latency is mostly queueing. Paced runs
    (agents arriving at a rate well below capacity) measure the latency of one step itself.
    """
    results = await compare(agents)
    results["memory_paced"] = await run_case(InMemoryPersistence(), agents, rate=200)
    for sync in ("NORMAL", "FULL"):
        results[f"sqlite_{sync.lower()}_paced"] = await _sqlite_case(agents, sync, rate=100)
    return results
