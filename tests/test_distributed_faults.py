"""Fault tests with real processes and servers (issue 3 item 5).

``commandnet worker`` subprocesses on a real PostgreSQL (the session fixture's server, which
these tests crash and restart) and a NATS server of the test's own. Every wait is bounded and
says what it waited for; every process started here is killed in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from commandnet.local.nats import NatsServer
from commandnet.local.postgres import PostgresServer
from tests.graphs import failing, gate
from tests.graphs.procs import WorkerProc, clean_env, wait_until

pytestmark = pytest.mark.slow

LINEAR = "commandnet.examples.linear:Start"
AGENTS = 1000
STEPS = 10
LEASE = 2.0
ACK_WAIT = 3.0  # short, so acks lost with killed workers come back quickly
VISITED = [f"Step{i}" for i in range(STEPS)]


# ------------------------------------------------------------------------------ helpers


def sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query on a connection of its own (the server may have restarted meanwhile)."""
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def sql_or_none(dsn: str, query: str, *args: Any) -> list[asyncpg.Record] | None:
    """:func:`sql`, or None while the server is unreachable (during its restart)."""
    try:
        return sql(dsn, query, *args)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        return None


def setup_schema(dsn: str) -> None:
    """Apply the migrations once, before the workers start."""
    from commandnet.adapters.postgres import PostgresPersistence

    async def go() -> None:
        store = PostgresPersistence(dsn, min_size=1, max_size=2)
        await store.setup()
        await store.close()

    asyncio.run(go())


def trigger(dsn: str, nats_url: str, pool: str, start: Any,
            agents: dict[str, dict[str, Any]]) -> None:
    """Trigger ``agents`` (id -> initial context) as a client would: store row + first step."""
    from commandnet.adapters.nats import JetStreamBus
    from commandnet.adapters.postgres import PostgresPersistence
    from commandnet.engine import Engine

    async def go() -> None:
        engine = Engine(PostgresPersistence(dsn, min_size=1, max_size=16),
                        JetStreamBus(nats_url, pool=pool), graphs=[start])
        await engine.start()
        try:
            slots = asyncio.Semaphore(16)

            async def one(agent_id: str, ctx: dict[str, Any]) -> None:
                async with slots:
                    assert await engine.trigger_agent(agent_id, start, ctx), agent_id

            await asyncio.gather(*(one(a, c) for a, c in agents.items()))
        finally:
            await engine.stop()

    asyncio.run(go())


def bus_state(nats_url: str, pool: str) -> tuple[int, int]:
    """(unacknowledged messages of the pool's consumer, dead letters of the pool)."""
    from commandnet.adapters.nats import JetStreamBus

    async def go() -> tuple[int, int]:
        bus = JetStreamBus(nats_url, pool=pool)
        await bus.connect()
        try:
            return await bus.lag(), len(await bus.dead_letters())
        finally:
            await bus.close()

    return asyncio.run(go())


class Fleet:
    """Worker processes of one pool; :meth:`kill_and_replace` is the SIGKILL of the chaos."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.args = args
        self.env = env
        self.live: list[WorkerProc] = []
        self.dead: list[WorkerProc] = []
        self._ids = itertools.count()

    def spawn(self) -> WorkerProc:
        n = next(self._ids)
        proc = WorkerProc([*self.args, "--worker-id", f"w{n}"], self.tmp_path / f"w{n}.log",
                          env=self.env)
        self.live.append(proc)
        return proc

    def kill_and_replace(self, proc: WorkerProc) -> None:
        proc.proc.send_signal(signal.SIGKILL)
        proc.stop()
        self.live.remove(proc)
        self.dead.append(proc)
        self.spawn()

    def replace_exited(self) -> int:
        """Start a replacement for any worker that exited on its own (store down at start)."""
        gone = [p for p in self.live if p.proc.poll() is not None]
        for proc in gone:
            proc.stop()
            self.live.remove(proc)
            self.dead.append(proc)
            self.spawn()
        return len(gone)

    def stop_all(self) -> None:
        for proc in [*self.live, *self.dead]:
            with contextlib.suppress(Exception):
                proc.stop()

    def logs(self, limit: int = 3000) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log[-limit:]}" for p in self.live)


# ------------------------------------------------------------------------------ tests


def test_thousand_agents_survive_sigkills_and_server_restarts(
    tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer,
    restartable_nats: NatsServer,
) -> None:
    """3 workers, one SIGKILLed every ~0.5 s, NATS and PostgreSQL each crashed once."""
    pool = "chaos"
    dsn, nats = postgres_dsn, restartable_nats
    setup_schema(dsn)
    # Steps of 20 ms, 16 at once per worker: the run outlasts 10 SIGKILLs (with local handoff
    # a worker runs an agent's steps back to back).
    env = clean_env(COMMANDNET_EXAMPLE_DELAY="0.02")
    fleet = Fleet(tmp_path, [
        "--graph", LINEAR, "--pool", pool, "--store", dsn, "--bus", nats.url,
        "--max-in-flight", "16",
        "--lease-seconds", str(LEASE), "--ack-wait", str(ACK_WAIT), "--sweep-interval", "0.5",
        "--outbox-grace", "1",
        "--stall-after", "4", "--drain-grace", "1", "--log-level", "WARNING",
        "--no-migrate"], env)
    kills = nats_restarted = pg_restarted = 0
    try:
        for _ in range(3):
            fleet.spawn()
        for proc in list(fleet.live):
            proc.wait_ready(90)
        from commandnet.examples.linear import Start
        trigger(dsn, nats.url, pool, Start, {f"a{i}": {"visited": []} for i in range(AGENTS)})

        began = time.monotonic()
        deadline = began + 180
        last_kill = 0.0
        done = 0
        while True:
            rows = sql_or_none(dsn, "SELECT (SELECT count(*) FROM history) AS h, "
                                    "(SELECT count(*) FROM agents WHERE status <> 'running') "
                                    "AS d")
            if rows is not None:
                transitions, done = rows[0]["h"], rows[0]["d"]
                if nats_restarted == 0 and transitions >= AGENTS * STEPS * 0.2:
                    nats.restart(crash=True)
                    nats_restarted += 1
                elif pg_restarted == 0 and transitions >= AGENTS * STEPS * 0.5:
                    postgres_server.restart(crash=True)
                    pg_restarted += 1
            if done >= AGENTS:
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after 180s: {done}/{AGENTS} agents final after {kills} kills\n"
                    f"{fleet.logs()}")
            fleet.replace_exited()
            if time.monotonic() - last_kill >= 0.5:
                ready = [p for p in fleet.live if p.get("/readyz")[0] == 200]
                if ready:  # the oldest running worker: the one holding the most work
                    fleet.kill_and_replace(ready[0])
                    kills += 1
                    last_kill = time.monotonic()
            time.sleep(0.05)

        print(f"\nchaos: {AGENTS} agents final after {time.monotonic() - began:.1f}s, "
              f"{kills} SIGKILLs, {len(fleet.dead)} workers replaced, NATS and PostgreSQL "
              f"crashed and restarted once each")
        assert kills >= 10, f"only {kills} SIGKILLs happened during the run"
        assert (nats_restarted, pg_restarted) == (1, 1), "a server restart did not happen"

        agents = sql(dsn, "SELECT agent_id, status, step, context FROM agents")
        assert len(agents) == AGENTS
        wrong = [(r["agent_id"], r["status"], r["step"]) for r in agents
                 if r["status"] != "succeeded" or r["step"] != STEPS]
        assert not wrong, f"{len(wrong)} agents not succeeded at step {STEPS}: {wrong[:5]}"
        import json
        doubled = [r["agent_id"] for r in agents
                   if json.loads(r["context"])["visited"] != VISITED]
        assert not doubled, f"context shows a doubled or lost transition: {doubled[:5]}"
        history = sql(dsn, "SELECT agent_id, count(*) AS n, count(DISTINCT step) AS steps, "
                           "min(step) AS lo, max(step) AS hi FROM history GROUP BY agent_id")
        bad = [dict(r) for r in history
               if (r["n"], r["steps"], r["lo"], r["hi"]) != (STEPS, STEPS, 1, STEPS)]
        assert len(history) == AGENTS and not bad, f"history not 10 distinct rows: {bad[:5]}"

        # Acks are fire-and-forget: one lost with a killed worker comes back after ack_wait
        # and is then acknowledged as stale. So wait (bounded) past ack_wait for zero.
        state: dict[str, tuple[int, int]] = {}

        def drained() -> bool:
            fleet.replace_exited()
            state["now"] = bus_state(nats.url, pool)
            return state["now"][0] == 0

        settle = time.monotonic()
        wait_until(drained, ACK_WAIT * 2 + 30,
                   f"the stream to hold nothing unacknowledged (lag, dead letters: "
                   f"{state.get('now')})", interval=1.0)
        assert state["now"] == (0, 0), f"lag and dead letters at the end: {state['now']}"
        print(f"stream drained {time.monotonic() - settle:.1f}s after the last agent ended")
    finally:
        fleet.stop_all()


def test_a_dead_workers_lease_is_taken_over_after_it_expires(
    tmp_path: Path, postgres_dsn: str, restartable_nats: NatsServer,
) -> None:
    """Worker A dies inside a node; B takes the agent over once A's lease expires."""
    pool = "takeover"
    dsn, nats = postgres_dsn, restartable_nats
    setup_schema(dsn)
    started, release = tmp_path / "started", tmp_path / "release"
    args = ["--graph", "tests.graphs.gate:Hold", "--pool", pool, "--store", dsn,
            "--bus", nats.url, "--lease-seconds", str(LEASE), "--sweep-interval", "0.5",
            "--stall-after", "3", "--log-level", "WARNING", "--no-migrate"]
    first = WorkerProc([*args, "--worker-id", "A"], tmp_path / "a.log")
    second: WorkerProc | None = None
    try:
        first.wait_ready(90)
        trigger(dsn, nats.url, pool, gate.Hold, {"g1": gate.Gate(
            started_file=str(started), release_file=str(release)).model_dump()})
        wait_until(lambda: started.exists() and started.read_text().split(),
                   60, f"worker A to start node Hold\n{first.log}")
        held = sql(dsn, "SELECT lease_owner, step FROM agents WHERE agent_id = 'g1'")[0]
        assert (held["lease_owner"], held["step"]) == ("A", 0)
        first.proc.send_signal(signal.SIGKILL)
        first.wait(30)
        release.touch()  # whoever runs Hold next finishes it at once

        second = WorkerProc([*args, "--worker-id", "B"], tmp_path / "b.log")
        second.wait_ready(90)
        b_pid = second.proc.pid

        def final() -> list[asyncpg.Record] | None:
            rows = sql(dsn, "SELECT status, step, context FROM agents WHERE agent_id = 'g1'")
            return rows if rows[0]["status"] != "running" else None

        rows = wait_until(final, 90, f"worker B to take over and finish g1\n{second.log}")
        assert (rows[0]["status"], rows[0]["step"]) == ("succeeded", 2)
        import json
        assert json.loads(rows[0]["context"])["finished_by"] == b_pid
        runs = started.read_text().split()
        assert runs == [str(first.proc.pid), str(b_pid)], f"Hold ran in {runs}"
        history = sql(dsn, "SELECT step, from_node FROM history WHERE agent_id = 'g1' "
                           "ORDER BY step")
        assert [(r["step"], r["from_node"]) for r in history] == [(1, "Hold"), (2, "Done")]
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_node_that_always_raises_ends_failed_with_its_error(
    tmp_path: Path, postgres_dsn: str, restartable_nats: NatsServer,
) -> None:
    """AlwaysFails has 2 attempts: then the agent is failed, the error kept, no transition."""
    pool = "failing"
    dsn, nats = postgres_dsn, restartable_nats
    setup_schema(dsn)
    worker = WorkerProc(["--graph", "tests.graphs.failing:AlwaysFails", "--pool", pool,
                         "--store", dsn, "--bus", nats.url, "--log-level", "WARNING",
                         "--no-migrate"], tmp_path / "w.log")
    try:
        worker.wait_ready(90)
        trigger(dsn, nats.url, pool, failing.AlwaysFails, {"f1": {"n": 7}})

        def final() -> list[asyncpg.Record] | None:
            rows = sql(dsn, "SELECT status, step, attempts, error FROM agents "
                            "WHERE agent_id = 'f1'")
            return rows if rows[0]["status"] != "running" else None

        row = wait_until(final, 60, f"agent f1 to end\n{worker.log}")[0]
        assert (row["status"], row["step"], row["attempts"]) == ("failed", 0, 2)
        assert "AlwaysFails failed on purpose (n=7)" in (row["error"] or "")
        assert sql(dsn, "SELECT count(*) AS n FROM history WHERE agent_id = 'f1'")[0]["n"] == 0
        assert worker.proc.poll() is None, f"the worker died:\n{worker.log}"
    finally:
        worker.stop()
