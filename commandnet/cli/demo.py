"""``commandnet demo``: run the bundled order flow for N agents, with live progress and a summary.

Each order fans out into parallel branches (one sub-agent per line item) joined once, and waits
on a durable timer before it ships: the summary counts both, read back from the store.

Embedded defaults, nothing to install: a SQLite file in a temporary folder, and either
``--workers`` separate worker processes sharing it over an embedded nats-server, or
(``--workers 0``) one process with an in-memory bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..adapters.memory import InMemoryEventBus
from ..adapters.sqlite import SQLitePersistence
from ..engine import Engine
from ..errors import CommandNetError
from ..examples.orders import COURIER_WAIT, Intake, Order
from ..graph import GraphAnalyzer

GRAPH = "commandnet.examples.orders:Intake"


@click.command()
@click.option("--agents", default=100, show_default=True, help="How many orders to run.")
@click.option("--workers", default=2, show_default=True,
              help="Worker processes sharing an embedded nats-server (0: run in this process "
                   "on an in-memory bus).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the SQLite file here (default: a temporary folder).")
@click.option("--seed", type=int, default=None, help="Seed the simulated provider's failures.")
def demo(agents: int, workers: int, workdir: Path | None, seed: int | None) -> None:
    """Run the bundled order flow (branching, a manual-review path, a flaky retried payment, a
    fan-out per line item and a durable timer)."""
    if seed is not None:
        random.seed(seed)
    # Retries and failures are part of the show: the summary reports them, the log need not.
    logging.getLogger("commandnet").setLevel(logging.CRITICAL)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="commandnet-demo-") as tmp:
        folder = workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        db = folder / "demo.db"
        db.unlink(missing_ok=True)
        console.print(f"[bold]commandnet demo[/]: {agents} orders, "
                      f"{workers or 'no separate'} worker process(es), store {db}")
        started = time.monotonic()
        runner: Runner = _in_process if workers == 0 else _multi_process(workers)
        try:
            asyncio.run(runner(db, agents, lambda: _progress(console, db, agents)))
        except CommandNetError as exc:  # a missing nats-server binary, say: no traceback
            raise click.ClickException(str(exc)) from None
        elapsed = time.monotonic() - started
        _summary(console, db, elapsed)


Watch = Callable[[], AbstractAsyncContextManager[None]]
Runner = Callable[[Path, int, Watch], Coroutine[Any, Any, None]]


async def _in_process(db: Path, agents: int, watch: Watch) -> None:
    engine = Engine(SQLitePersistence(db), InMemoryEventBus(), graphs=[Intake], max_in_flight=64)
    await engine.start_worker()
    try:
        async with watch():
            await _trigger_all(engine, agents)
    finally:
        await engine.stop()


def _multi_process(workers: int) -> Runner:
    async def run(db: Path, agents: int, watch: Watch) -> None:
        from .demo_cluster import run_cluster

        await run_cluster(db, agents, workers, GRAPH, watch, _trigger_all)

    return run


async def _trigger_all(engine: Engine, agents: int) -> None:
    for i in range(agents):
        amount = round(random.uniform(5, 900), 2)
        await engine.trigger_agent(f"order-{i:05d}", Intake,
                                   Order(order_id=f"order-{i:05d}", amount=amount))


class _progress(AbstractAsyncContextManager[None]):
    """Draws a bar from the SQLite file (whoever writes it) from entry until every agent is final.

    The body triggers the agents; on exit the bar keeps polling until all have finished.
    """

    def __init__(self, console: Console, db: Path, total: int) -> None:
        self.console, self.db, self.total = console, db, total
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> None:
        self._task = asyncio.create_task(self._draw())

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        if exc[0] is not None:
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _draw(self) -> None:
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(10),
                   MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task("agents finished", total=self.total)
            while True:
                finished, running, parked, branches, transitions = await asyncio.to_thread(
                    _counts, self.db)
                bar.update(task, completed=finished,
                           description=f"running {running:3d} parked {parked:3d} branches "
                                       f"{branches:4d} steps {transitions:5d}")
                if finished >= self.total:
                    break
                await asyncio.sleep(0.1)


def _counts(db: Path) -> tuple[int, int, int, int, int]:
    """Orders finished and running, orders parked (a timer or a join), branches, transitions.

    Fan-out branches are agents too (with a parent): they are counted apart from the orders.
    """
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            by_status = dict(conn.execute("SELECT status, count(*) FROM agents "
                                          "WHERE parent_id IS NULL GROUP BY status"))
            parked, branches = conn.execute(
                "SELECT count(*) FILTER (WHERE parent_id IS NULL AND status = 'running' AND "
                "(wake_at IS NOT NULL OR joining IS NOT NULL)), "
                "count(*) FILTER (WHERE parent_id IS NOT NULL) FROM agents").fetchone()
            transitions = conn.execute("SELECT count(*) FROM history").fetchone()[0]
    except sqlite3.OperationalError:  # no file or schema yet
        return 0, 0, 0, 0, 0
    running = by_status.pop("running", 0)
    return sum(by_status.values()), running, parked, branches, transitions


def _edges(kind: str) -> list[tuple[str, str]]:
    """The order flow's edges of one kind: "sleep" (a timer), "join" (a fan-out's join)."""
    graph = GraphAnalyzer.validate(Intake)
    return sorted(edge for edge, kinds in graph.kinds.items() if kind in kinds)


def _on(edges: list[tuple[str, str]], table: str = "history") -> str:
    """SQL matching history rows on ``edges`` (names come from the graph, not from input)."""
    return " OR ".join(f"({table}.from_node = '{a}' AND {table}.to_node = '{b}')"
                       for a, b in edges) or "0"


def _summary(console: Console, db: Path, elapsed: float) -> None:
    with sqlite3.connect(db, timeout=5) as conn:
        rows = conn.execute("SELECT status, node, count(*) FROM agents WHERE parent_id IS NULL "
                            "GROUP BY status, node ORDER BY status, node").fetchall()
        transitions = conn.execute("SELECT count(*) FROM history").fetchone()[0]
        retried = conn.execute("SELECT count(*) FROM history WHERE attempts > 1").fetchone()[0]
        errors = conn.execute("SELECT agent_id, node, error FROM agents WHERE status = 'failed' "
                              "AND parent_id IS NULL ORDER BY agent_id LIMIT 3").fetchall()
        branches = dict(conn.execute("SELECT status, count(*) FROM agents "
                                     "WHERE parent_id IS NOT NULL GROUP BY status").fetchall())
        fanned = conn.execute("SELECT count(DISTINCT parent_id) FROM agents "
                              "WHERE parent_id IS NOT NULL").fetchone()[0]
        joins = conn.execute(f"SELECT count(*) FROM history WHERE {_on(_edges('join'))}"
                             ).fetchone()[0]
        # A timer's wait: from the commit that parked the order to the next node's commit.
        timers, waited = conn.execute(
            "SELECT count(*), avg(n.at - h.at) FROM history h LEFT JOIN history n ON "
            f"n.agent_id = h.agent_id AND n.step = h.step + 1 WHERE {_on(_edges('sleep'), 'h')}"
        ).fetchone()
    table = Table(title="Orders by final node")
    table.add_column("status")
    table.add_column("final node")
    table.add_column("agents", justify="right")
    for status, node, count in rows:
        table.add_row(status, node, str(count))
    console.print(table)
    failed = sum(count for status, _, count in rows if status == "failed")
    console.print(f"failures: {failed}   steps that needed a retry: {retried}   "
                  f"transitions: {transitions} in {elapsed:.1f}s = "
                  f"[bold]{transitions / elapsed:.0f} transitions/s[/]")
    ended = ", ".join(f"{count} {status}" for status, count in sorted(branches.items()))
    console.print(f"fan-out: {sum(branches.values())} branches (one per line item, in parallel; "
                  f"{ended or 'none'}) for {fanned} orders, joined once each: {joins} joins")
    console.print(f"timers: {timers} orders parked in the store for the courier "
                  f"({COURIER_WAIT:g} s durable timer, no worker slot held): "
                  f"{waited or 0:.2f} s from parking to shipping on average")
    for agent_id, node, error in errors:
        console.print(f"  failed {agent_id} at {node}: {(error or '').splitlines()[0]}")
